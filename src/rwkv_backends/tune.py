"""`python -m rwkv_backends.tune`: sweep each kernel's configs on the present device and print the
vendor/architecture table entries, each with its provenance (card, torch, Triton, date, this run and
its measured time); `--write-table` merges them into rwkv_backends/<vendor>/tables/<arch>.json (or
the file it names). This is the only place a sweep runs; `wkv7` itself never tunes.

Every candidate is first checked against the float64 reference on fresh random inputs; a config
that is fast but wrong (or that fails to compile) is dropped, with the reason printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from .config import KernelConfig, head_bucket, padded_head

from .kernels.roles import ROLES

# The roles the tune tool sweeps, each over its spec's candidates (kernels/roles.py TuneSpec).
CANDIDATES = {name: role.tune.sweep for name, role in ROLES.items() if role.tune is not None}
# Launch options only one vendor's Triton takes are swept as well on that vendor's devices: the
# vendor folder's TUNE_CANDIDATES (vendors.tune_candidates).
BACKWARD_KERNELS = tuple(name for name in CANDIDATES if ROLES[name].tune.backward)
# Accuracy bar a config must meet (bf16 inputs): the peers' measured o error (ANCHORS.md).
MAX_BF16_ERROR = 3.0e-3


# Where the sweep runs (a test points it at the CPU and the interpreter).
DEVICE = "cuda"


def _inputs(B, T, H, K, seed):
    from .conformance.cases import Case, make_inputs
    return make_inputs(Case("forward", "bfloat16", "realistic", B, T, H, K, K), seed, DEVICE)


def _table_config(kernel, K):
    """`kernel`'s table entry on this device (what the swept kernel runs beside), narrowed as a plan
    narrows it: by the active known issues, and to the Triton kernel where the entry's Gluon one
    cannot take the tune problem (another K, the interpreter)."""
    from types import SimpleNamespace

    from . import known_issues
    from .device import detect, triton_version
    from .tuning import lookup
    info = detect(DEVICE)
    cfg, _ = lookup(info, kernel, SimpleNamespace(K=K, V=K))
    cfg, _ = known_issues.constrain(kernel, cfg, known_issues.active(info, triton_version()))
    return _fit_gluon(kernel, cfg, K, segmented=kernel == "chunk_bwd_split")


def _fit_gluon(kernel, cfg, K, segmented=False):
    """cfg, or cfg with gluon off where the Gluon kernel cannot take the tune problem's launch: the
    plans' rule (backends/triton.py gluon_fallbacks) on the tune problem (bf16 inputs, K = V; the
    chunked kernels' tune problems are never one step long, so T does not rule anything out)."""
    from types import SimpleNamespace

    from .backends.triton import gluon_fallbacks
    from .device import detect
    problem = SimpleNamespace(K=K, V=K, T=None, dtype=torch.bfloat16)
    changed = gluon_fallbacks(problem, detect(DEVICE), {kernel: cfg}, (kernel,), segmented=segmented)
    return changed[kernel][0] if kernel in changed else cfg


def _prep_config(chunk_size, K):
    """chunk_prep's table entry on this device, at `chunk_size` (what chunk_fwd_loaded loads)."""
    return _table_config("chunk_prep", K).with_(chunk_size=chunk_size)


def _segmented_training_backward(kernel, cfg, x):
    """chunk_bwd_split or chunk_recompute as two-pass training runs them: the forward (table
    configs) keeps the chunk matrices and the segments' start states; the backward is timed."""
    from .backends.triton import segments_per_sequence
    from .device import detect
    from .kernels import backward, common, twopass
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    B, _, H, K = x["k"].shape
    cfgs = {name: _table_config(name, K) for name in ("chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split",
                                                      "chunk_recompute")} | {kernel: cfg}
    segments = segments_per_sequence(B * H, x["v"].shape[-1], cfgs["chunk_bwd_split"].block_v,
                                     detect(DEVICE).multiprocessors)
    seg_states, seg_len = common.segment_states(x["k"], x["v"], None, segments,
                                                (cfgs["chunk_prep"].chunk_size, cfgs["chunk_bwd_split"].chunk_size))
    u = common.empty_u(x["v"], common.keeps_u(cfgs["chunk_bwd_split"]))
    _, _, mats = twopass.twopass_forward(*args, x["state"], scale=1.0, cu_seqlens=None, w_form="log",
                                         cfg_prep=cfgs["chunk_prep"], cfg_fwd=cfgs["chunk_fwd_loaded"],
                                         programs_per_sequence=4, seg_states=seg_states, seg_len=seg_len, u=u)
    return lambda: backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], scale=1.0, cu_seqlens=None,
                                           w_form="log", cfg_fwd=cfgs["chunk_fwd_loaded"],
                                           cfg_bwd=cfgs["chunk_bwd_split"], mats=mats, seg_states=seg_states,
                                           seg_len=seg_len, cfg_recompute=cfgs["chunk_recompute"], u=u,
                                           cfg_states=_table_config("chunk_states", K))


def _transition_programs(x) -> int:
    from .backends.triton import transition_programs
    from .device import detect
    B, _, H, _ = x["k"].shape
    return transition_programs(B * H, detect(DEVICE).multiprocessors)


def _transition_runner(kernel, cfg, x, for_error_check):
    """chunk_transition alone (for the error check: with the walk), or the walk and the sweep on
    the transitions of chunk_transition's table entry."""
    from .kernels import common, transition
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    P = _transition_programs(x)
    if kernel == "chunk_transition":
        if for_error_check:
            walk = KernelConfig(block_v=64, dot_precision=cfg.dot_precision)
            return lambda: transition.transition_twopass(*args, x["state"], scale=1.0, cu_seqlens=None, w_form="log",
                                                         cfg_trans=cfg, cfg_walk=walk, programs_per_sequence=P)[:2]
        return lambda: transition.chunk_transitions(*(x[n] for n in ("r", "w", "k", "a", "b")), cu_seqlens=None,
                                                    w_form="log", cfg=cfg, programs_per_sequence=P)
    cfg_trans = _table_config("chunk_transition", x["k"].shape[-1])
    trans, p_mat, q_mat, r_eff = transition.chunk_transitions(*(x[n] for n in ("r", "w", "k", "a", "b")),
                                                              cu_seqlens=None, w_form="log", cfg=cfg_trans,
                                                              programs_per_sequence=P)
    walk = lambda: transition.transition_forward(x["v"], x["state"], trans, p_mat, q_mat, r_eff, scale=1.0,  # noqa: E731
                                                 cu_seqlens=None, cfg=cfg)
    if for_error_check:
        return walk
    seg_states, seg_len = common.segment_states(x["k"], x["v"], None, 4, (cfg_trans.chunk_size,))
    seg_ds, dh0 = torch.empty_like(seg_states), torch.empty_like(x["state"])

    def walk_and_sweep():
        walk()
        transition.transition_dstate(x["do"], x["dstate"], trans, r_eff, seg_ds, dh0, scale=1.0, cu_seqlens=None,
                                     cfg=cfg, chunk_size=cfg_trans.chunk_size, seg_len=seg_len)
    return walk_and_sweep


def _prep_runner(kernel, cfg, x, for_error_check):
    from .kernels import twopass
    prep_args = [x[n] for n in ("r", "w", "k", "a", "b")]
    if not for_error_check:
        return lambda: twopass.chunk_prepare(*prep_args, cu_seqlens=None, w_form="log", cfg=cfg,
                                             programs_per_sequence=16)
    # For the error check: the loaded forward's output on these matrices.
    fwd = KernelConfig(block_v=64, dot_precision=cfg.dot_precision)
    return lambda: twopass.twopass_forward(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), x["state"], scale=1.0,
                                           cu_seqlens=None, w_form="log", cfg_prep=cfg, cfg_fwd=fwd,
                                           programs_per_sequence=16)[:2]


def _loaded_runner(kernel, cfg, x, for_error_check):
    from .kernels import chunk, twopass
    prep_cfg = _prep_config(cfg.chunk_size, x["k"].shape[-1])
    mats = twopass.chunk_prepare(*(x[n] for n in ("r", "w", "k", "a", "b")), cu_seqlens=None, w_form="log",
                                 cfg=prep_cfg, programs_per_sequence=16)
    return lambda: chunk.chunk_forward(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), x["state"], scale=1.0,
                                       cu_seqlens=None, w_form="log", cfg=cfg, mats=mats, mats_mode="load")[:2]


def _recurrent_runner(kernel, cfg, x, for_error_check):
    from .kernels import recurrent
    return lambda: recurrent.recurrent_forward(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), x["state"], scale=1.0,
                                               cu_seqlens=None, w_form="log", cfg=cfg)


def _forward_runner(kernel, cfg, x, for_error_check):
    from .kernels import chunk
    return lambda: chunk.chunk_forward(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), x["state"], scale=1.0,
                                       cu_seqlens=None, w_form="log", cfg=cfg)[:2]


def _backward_runner(kernel, cfg, x, for_error_check):
    """chunk_bwd (and chunk_states), as in training: the forward (its table entry, at this chunk
    size) has stored the chunk matrices and U if keep_u asks for it, the backward loads them."""
    from .kernels import backward, chunk, common
    args = [x[n] for n in ("r", "w", "k", "v", "a", "b")]
    K = x["k"].shape[-1]
    bwd_cfg = _table_config("chunk_bwd", K) if kernel == "chunk_states" else cfg
    fwd_cfg = _fit_gluon("chunk_fwd", _table_config("chunk_fwd", K).with_(chunk_size=bwd_cfg.chunk_size), K)
    states_cfg = cfg if kernel == "chunk_states" else _fit_gluon(
        "chunk_states", _table_config("chunk_states", K).with_(chunk_size=bwd_cfg.chunk_size), K)
    mats = common.empty_mats(x["k"], None, bwd_cfg.chunk_size)
    u = common.empty_u(x["v"], common.keeps_u(bwd_cfg))
    chunk.chunk_forward(*args, x["state"], scale=1.0, cu_seqlens=None, w_form="log", cfg=fwd_cfg, mats=mats,
                        mats_mode="store", u=u)
    if kernel == "chunk_states" and not for_error_check:
        if u is None:
            raise ValueError("chunk_states: the table's chunk_bwd entry keeps no U (keep_u False), so training "
                             "never runs chunk_states here")
        states = common.empty_states(x["k"], x["v"], None, bwd_cfg.chunk_size)
        return lambda: chunk.chunk_states(x["w"], x["k"], x["v"], x["b"], u, x["state"], cu_seqlens=None,
                                          cfg=states_cfg.with_(chunk_size=bwd_cfg.chunk_size), w_form="log",
                                          states=states)
    return lambda: backward.chunk_backward(*args, x["state"], x["do"], x["dstate"], scale=1.0, cu_seqlens=None,
                                           w_form="log", cfg_fwd=fwd_cfg, cfg_bwd=bwd_cfg, mats=mats, u=u,
                                           cfg_states=states_cfg)


# How each role runs under the sweep (kernels/roles.py TuneSpec.runner).
_RUNNERS = {"transition": _transition_runner, "prep": _prep_runner, "loaded": _loaded_runner,
            "recurrent": _recurrent_runner, "forward": _forward_runner, "backward": _backward_runner,
            "segmented_backward": lambda kernel, cfg, x, for_error_check: _segmented_training_backward(kernel, cfg, x)}


def _runner(kernel, cfg, x, for_error_check=False):
    return _RUNNERS[ROLES[kernel].tune.runner](kernel, cfg, x, for_error_check)


def _error(kernel, cfg, K):
    """Relative error of the kernel's first output against the float64 reference (small problem)."""
    from .conformance.cases import relative_error
    from .reference import wkv7_reference
    T = 4 if kernel == "recurrent_fwd" else 200
    x = _inputs(2, T, 2, K, seed=torch.randint(0, 2 ** 30, ()).item())
    backward = kernel in BACKWARD_KERNELS
    ins = [x[n].double().requires_grad_(backward) for n in ("r", "w", "k", "v", "a", "b")]
    st = x["state"].double().requires_grad_(backward)
    o_ref, s_ref = wkv7_reference(*ins, st)
    out = _runner(kernel, cfg, x, for_error_check=True)()
    if not backward:
        return relative_error(out[0], o_ref)
    (o_ref * x["do"].double()).sum().add((s_ref * x["dstate"]).sum()).backward()
    return max(relative_error(g, t.grad) for g, t in zip(out[:6], ins))


def candidates(kernel, vendor, V=None, fixed=None):
    """Every config the sweep tries for `kernel` on a `vendor` device. With the head size V, V blocks
    wider than V are left out: they launch exactly as the block of V itself (the H100's K = 64
    sweep timed block_v 128 beside 64 and picked it, a name for the same launch). `fixed`
    ({field: values}) narrows the fields the kernel sweeps to those values."""
    from .vendors import tune_candidates
    grid = dict(CANDIDATES[kernel]) | tune_candidates(vendor).get(kernel, {})
    for name, values in (fixed or {}).items():
        if name in grid:
            kept = tuple(v for v in grid[name] if v in values)
            if not kept:
                raise ValueError(f"--only: {kernel} sweeps {name} over {grid[name]}; none of {values} is among them")
            grid[name] = kept
    configs = [KernelConfig.make(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    # A Gluon kernel ignores the launch fields: one candidate per combination of the fields it reads.
    configs = list(dict.fromkeys(cfg.with_(**ROLES[kernel].gluon.launch, num_stages=1, vendor_options=()) if cfg.gluon
                                 else cfg
                                 for cfg in configs))
    if V is not None and "block_v" in grid:
        configs = [cfg for cfg in configs if cfg.block_v <= padded_head(V)]
    return configs


def peak_mib(fn) -> float:
    """How far one call of `fn` lifts the device allocator's peak above what was allocated before
    it, in MiB (benchmarks/bench_wkv7.py reports peak memory the same way)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def sweep(kernel, shape, K, vendor, fixed=None):
    from triton.testing import do_bench
    B, T, H = shape
    x = _inputs(B, T, H, K, seed=0)
    results = []
    for cfg in candidates(kernel, vendor, V=K, fixed=fixed):
        try:
            err = _error(kernel, cfg, K)
            limit = MAX_BF16_ERROR * (2 if kernel in BACKWARD_KERNELS else 1)
            if not err <= limit:
                print(f"  drop {cfg}: error {err:.2e} > {limit:.1e}", flush=True)
                continue
            run = _runner(kernel, cfg, x)
            peak = peak_mib(run)
            ms = do_bench(run, warmup=25, rep=100, return_mode="median")
        except Exception as exc:
            print(f"  drop {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        results.append((ms, err, cfg, peak))
        print(f"  {ms:8.3f} ms  err {err:.2e}  peak {peak:8.1f} MiB  {cfg}", flush=True)
    results.sort(key=lambda r: r[0])
    return results


# The backward's V split trades memory for time: each V block adds a float32 share of five
# gradients (at B1 T16384 H32, BV 16 against BV 32: 2% faster, 1.3 GB more, past fla-core's peak).
# Within this factor of the fastest, the backward config that holds the least memory wins.
MEMORY_SLACK = 1.05
# Peaks this close count as equal, and the faster config wins: launch shapes differ by fractions of
# a MiB of allocator rounding (the H100's K = 64 sweep: 1033.0 against 1033.5 MiB picked a config
# 3.6% slower than the fastest).
MEMORY_TIE = 1.02


def _least_memory_near_fastest(rows):
    near = [row for row in rows if row[0] <= rows[0][0] * MEMORY_SLACK]
    least = min(row[3] for row in near)
    return min((row for row in near if row[3] <= least * MEMORY_TIE), key=lambda row: row[0])


def pick(ranked: dict) -> dict:
    """The config each kernel's table entry gets, from `sweep`'s rankings (fastest first; rows are
    (ms, error, config, peak MiB)).

    chunk_prep and chunk_fwd_loaded run back to back at one chunk size (the loaded forward reads
    what the prep built), so when both were swept they get the chunk size with the least summed
    time, and each its fastest config at that size: the fastest of each alone may not share one.
    The backward kernels take the least memory within MEMORY_SLACK of the fastest."""
    best = {kernel: (_least_memory_near_fastest(rows) if kernel in BACKWARD_KERNELS else rows[0])
            for kernel, rows in ranked.items() if rows}
    pair = ("chunk_prep", "chunk_fwd_loaded")
    if all(kernel in best for kernel in pair):
        def fastest_at(kernel, chunk):
            return next(row for row in ranked[kernel] if row[2].chunk_size == chunk)
        shared = {row[2].chunk_size for row in ranked[pair[0]]} & {row[2].chunk_size for row in ranked[pair[1]]}
        if shared:
            chunk = min(shared, key=lambda c: sum(fastest_at(kernel, c)[0] for kernel in pair))
            best.update({kernel: fastest_at(kernel, chunk) for kernel in pair})
        else:
            print("  warning: chunk_prep and chunk_fwd_loaded share no chunk size; fix one entry by hand")
    return best


def unsweepable(kernels, K) -> dict:
    """{kernel: why} for requested kernels that this device's tables never run, so that a sweep of
    them would time nothing real: chunk_states runs only where the chunk_bwd entry keeps U."""
    from .kernels.common import keeps_u
    why = {}
    if "chunk_states" in kernels and not keeps_u(_table_config("chunk_bwd", K)):
        why["chunk_states"] = (f"the table's chunk_bwd entry at K = {K} keeps no U (keep_u False), so training never "
                               "runs chunk_states; write a chunk_bwd entry with keep_u first (--write-table)")
    return why


def _parse_bool(text: str) -> bool:
    # bool("false") is True: flags are read by name
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(text)


def _parse_only(items) -> dict:
    """--only FIELD=V1,V2 ... as {field: values}, the values typed as the field's (int, str or bool)."""
    fields = KernelConfig.__dataclass_fields__
    fixed = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in fields or name == "vendor_options" or not values:
            raise ValueError(f"--only: expected FIELD=V1,V2 with FIELD one of "
                             f"{sorted(set(fields) - {'vendor_options'})}, got {item!r}")
        kind = type(getattr(KernelConfig(), name))
        try:
            fixed[name] = tuple(_parse_bool(v) if kind is bool else kind(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--only: {name} takes {kind.__name__} values, got {values!r}") from None
    return fixed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_backends.tune", description=__doc__)
    p.add_argument("--kernels", default=",".join(CANDIDATES))
    p.add_argument("--K", type=int, default=64, help="head size to tune (table bucket 64 or 128)")
    p.add_argument("--out", default="", help="write the picked entries and every timed candidate as JSON here")
    p.add_argument("--write-table", nargs="?", const="auto", default=None, metavar="FILE",
                   help="merge the picked entries, with their provenance, into this device's table file "
                        "(rwkv_backends/<vendor>/tables/<arch>.json), or into FILE")
    p.add_argument("--only", action="append", default=[], metavar="FIELD=V1,V2",
                   help="sweep only these values of a config field (repeatable), e.g. num_warps=8 or "
                        "dot_precision=tf32,bf16; fields a kernel does not sweep are ignored")
    args = p.parse_args(argv)
    try:
        fixed = _parse_only(args.only)
    except ValueError as exc:
        p.error(str(exc))
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in CANDIDATES]
    if unknown:
        p.error(f"--kernels: unknown {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    if not torch.cuda.is_available():
        print("tune: needs the accelerator it tunes for (no device visible)")
        return 2
    from .device import detect, versions
    info = detect("cuda")
    try:                                 # a value outside a kernel's grid would sweep nothing
        for kernel in kernels:
            candidates(kernel, info.vendor, V=args.K, fixed=fixed)
    except ValueError as exc:
        p.error(str(exc))
    shapes = {kernel: ROLES[kernel].tune.shape for kernel in CANDIDATES}
    if args.K > 64:
        shapes = {k: (max(1, b // 2), t, max(1, h // 2)) for k, (b, t, h) in shapes.items()}
        # The issue's head-128 shape has 64 (sequence, head) pairs, fewer than the multiprocessors,
        # so it runs the two-pass kernels; their best V split depends on the pair count (16 pairs
        # chose BV 16, which at 64 pairs made four waves of backward programs: 14 -> 23 ms).
        shapes |= {k: (4, 4096, 16) for k in ("chunk_prep", "chunk_fwd_loaded", "chunk_bwd_split", "chunk_recompute")}
    ranked = {}
    skipped = unsweepable(kernels, args.K)
    for kernel in kernels:
        if kernel in skipped:
            print(f"{kernel}: not swept: {skipped[kernel]}", flush=True)
            continue
        print(f"{kernel} on {info.name} ({info.arch}), B,T,H = {shapes[kernel]}, K = V = {args.K}", flush=True)
        ranked[kernel] = sweep(kernel, shapes[kernel], args.K, info.vendor, fixed)
    run = "python -m rwkv_backends.tune " + " ".join(sys.argv[1:] if argv is None else argv)
    report = tune_report(ranked, args.K) | {"vendor": info.vendor, "arch": info.arch, "device": info.name,
                                            "versions": versions()}
    report["table_entries"] = table_entries(ranked, args.K, info, versions(), shapes, run)
    print(json.dumps({k: v for k, v in report.items() if k not in ("ranked", "entry")}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    write_table(report["table_entries"], info, args.write_table)
    return 0


def _row(ms, err, cfg, peak) -> dict:
    return cfg.as_dict() | {"_ms": round(ms, 4), "_err": err, "_peak_mib": round(peak, 1)}


def table_entries(ranked: dict, K: int, info, versions: dict, shapes: dict, run: str) -> dict:
    """The entries `pick` chooses as the table files hold them: {kernel: {bucket: {"config": fields,
    "provenance": record}}}, the record naming this card, torch, Triton, today, the command line
    and the measured time, error and peak of the picked config at the swept shape."""
    from .tuning import config_fields, today
    bucket = head_bucket(K, K)
    out = {}
    for kernel, (ms, err, cfg, peak) in pick(ranked).items():
        B, T, H = shapes[kernel]
        measured = (f"{ms:.3f} ms at B{B} T{T} H{H} K = V = {K} (median, triton.testing.do_bench), error "
                    f"{err:.1e}, peak {peak:.1f} MiB; the fastest of {len(ranked[kernel])} configs that passed")
        out[kernel] = {bucket: {"config": config_fields(kernel, cfg),
                                "provenance": {"card": info.name, "torch": versions.get("torch"),
                                               "triton": versions.get("triton"), "date": today(), "run": run,
                                               "measured": measured}}}
    return out


def write_table(entries: dict, info, destination) -> str | None:
    """Merge `entries` into the table file `destination` names ("auto": this device's own file in its
    vendor folder); without a destination, say where --write-table would put them. Returns the path."""
    from . import tuning
    package = tuning.tables_package(info.vendor) or info.vendor
    own = tuning.table_path(package, info.arch)
    if not entries:
        return None
    if destination is None:
        print(f"entries not written: --write-table merges them into {own}")
        return None
    path = own if destination == "auto" else destination
    tuning.write_entries(path, package, info.arch, entries)
    print(f"wrote {sum(len(b) for b in entries.values())} entries into {path}")
    return path


def tune_report(ranked: dict, K: int) -> dict:
    """The table entry `pick` chooses, and every candidate that ran, fastest first (what --out writes:
    the ranking is what a later change is compared against)."""
    bucket = head_bucket(K, K)
    return {"entry": {kernel: {bucket: _row(*row)} for kernel, row in pick(ranked).items()},
            "ranked": {kernel: [_row(*row) for row in rows] for kernel, rows in ranked.items()}}


if __name__ == "__main__":
    sys.exit(main())
