"""NVIDIA tuning tables: {arch: {kernel: {head_bucket: KernelConfig}}}.

"default" serves any architecture without an entry of its own. Entries are written by
`python -m rwkv_backends.tune` on the card; PROVENANCE says which were measured and where.
"""

from ..config import KernelConfig as C

_DEFAULT = {
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    # Head 128's gradient kernels at a V block of 64 ask 112,640 B of shared memory, more than the
    # 101,376 B of Ada and consumer Blackwell parts (compile_check): 32 fits every sm80+ part.
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=32, num_warps=4)},
    "chunk_prep": {"64": C(chunk_size=16, block_k=32, num_warps=2), "128": C(chunk_size=16, block_k=32, num_warps=2)},
    "chunk_fwd_loaded": {"64": C(block_v=16, num_warps=4), "128": C(block_v=32, num_warps=4)},
    "chunk_transition": {"64": C(chunk_size=32, block_k=32, num_warps=2), "128": C(chunk_size=16, block_k=32, num_warps=4)},
    "chunk_fwd_transition": {"64": C(block_v=16, num_warps=2), "128": C(block_v=64, num_warps=4)},
    "chunk_bwd_split": {"64": C(chunk_size=16, block_v=32, num_warps=4), "128": C(chunk_size=16, block_v=32, num_warps=4)},
    "chunk_recompute": {"64": C(chunk_size=16, block_v=64, num_warps=4), "128": C(chunk_size=16, block_v=64, num_warps=4)},
    "chunk_states": {"64": C(block_v=64, num_warps=4), "128": C(block_v=64, num_warps=4)},
    "recurrent_fwd": {"64": C(block_v=16, num_warps=2), "128": C(block_v=32, num_warps=4)},
}

# sm90, measured on an H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0, 2026-11-27. tf32 and bf16
# dots apply to 16-bit inputs only; float32 inputs always get "ieee". Every entry comes from
# `python -m rwkv_backends.tune` on that card:
# - chunk_fwd and chunk_bwd, K/V <= 64: benchmarks/tune-sm90-2026-11-27.json; chunk_bwd from
#   tune-sm90-2026-11-27c.json (num_stages 2: 9.79 -> 8.86 ms for recompute + backward).
# - the two-pass kernels and recurrent_fwd at K/V <= 64: tune-sm90-2026-11-27-twopass64.json, at
#   B1 T16384 H32 (the prep and the loaded forward share the chunk size with the least summed time).
# - the two-pass kernels at K/V <= 128: tune-sm90-2026-11-27-twopass128b.json, at the issue's
#   B4 T4096 H16 (chunk_prep and recurrent_fwd from -twopass128.json, at B1 T16384 H16 and B128 T1 H16).
# - chunk_fwd and chunk_bwd at K/V <= 128 reuse the 64 bucket's launch shapes (chunk_fwd at one
#   stage): not swept at 128.
_SM90 = {
    # num_stages 3 (hand-run sweep, benchmarks/results-h100-2026-11-27d.json; the tool now sweeps
    # stages): prefill B8 T4096 H32 1.62 -> 1.48 ms, H64 3.16 -> 2.94 ms, the same errors to the bit
    # (2 stages: 1.59 and 3.17 ms). The loads of the next chunk no longer wait for this one's dots.
    # gluon (NOTES change 54): the Gluon forward (kernels/gluon/); prefill B8 T4096 H32 1.448 ->
    # 1.410 ms, training -1.5% (results-h100-2026-11-27r-gluon.json). The other fields are the Triton
    # kernel's, which runs where the Gluon one cannot (the plan says why).
    "chunk_fwd": {"64": C(chunk_size=16, block_v=64, num_warps=4, num_stages=3, dot_precision="tf32", gluon=True),
                  "128": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32")},
    # bf16 operands (NOTES change 43; the in-chunk pair products stay tf32), from the tune tool:
    # tune-sm90-2026-11-27-bf16-bwd64.json, recompute + backward 7.48 ms (tf32, 2 stages) -> 5.41 ms,
    # largest gradient error 3.0e-3 -> 3.7e-3 (bf16 inputs; fla-core's on the same inputs 4.0e-3).
    # 3 stages and 2 stages are within 1% (5.41 and 5.44 ms). The 128 bucket keeps 2 stages (its
    # shared memory at 3 was not measured).
    # keep_u (NOTES change 45): training keeps U (float32), the backward rebuilds the chunk states
    # from it (chunk_states) and the gradient kernel loads it. The tune tool,
    # tune-sm90-2026-11-27-u-bwd64.json: recompute + backward 5.41 -> 4.84 ms; training B8 T4096 H32
    # 6.82 -> 6.36 ms, H64 13.59 -> 12.72 ms (results-h100-2026-11-27-u.json).
    # gluon (NOTES change 51): the Gluon gradient kernel (kernels/gluon/; its own 8 warps and
    # cp.async pipeline). B8 T4096 H32 training 6.36 -> 5.29 ms, the gradient kernel 4.19 -> 3.05 ms
    # (results-h100-2026-11-27r-gluon.json); the tune tool picked it, recompute + backward 3.74 ms
    # (tune-sm90-2026-11-27-gluon-bwd64.json). Where it cannot run, the plan falls back to the Triton
    # kernel with this entry's other fields (they were tuned for it) and says why.
    "chunk_bwd": {"64": C(chunk_size=16, block_v=64, num_warps=8, num_stages=3, dot_precision="bf16", keep_u=True,
                          gluon=True),
                  "128": C(chunk_size=16, block_v=64, num_warps=8, num_stages=2, dot_precision="bf16")},
    # The state recompute from U at B8 T4096 H32, from the tune tool (tune-sm90-2026-11-27-u-states64.json):
    # 0.687 ms at BV 32, 1 warp, 3 stages; the forward's launch shape took 0.91 ms and the recompute
    # from the chunk matrices it replaces 0.94 (hand-run sweep, results-h100-2026-11-27-u.json).
    # gluon (NOTES change 56): the Gluon state rebuild, 0.748 -> 0.700 ms at B8 H32, 1.625 -> 1.430 ms
    # at H64 (results-h100-2026-11-27r-gluon.json).
    # K = V = 128: the segmented rebuild of head 128's two-pass training, beside the sweep. Hand-run
    # sweep of 18 launch shapes of the Triton kernel through training B4 T4096 H16 (NOTES change 61):
    # 4.71 ms at BV 32, 2 warps, 3 stages, against 4.99 for the default entry (ieee dots); then the
    # Gluon rebuild over segments (its own 4 warps, BV 64; change 62): 4.72 -> 4.65 ms. The Triton
    # fields stay for where it cannot run.
    "chunk_states": {"64": C(block_v=32, num_warps=1, num_stages=3, dot_precision="tf32", gluon=True),
                     "128": C(block_v=32, num_warps=2, num_stages=3, dot_precision="tf32", gluon=True)},
    # fp32 state: BV 32 and BV 64 tie (98.2 and 98.3 us at B256 H32, interleaved); a 16-bit state
    # runs 72 us at BV 32 and 65 us at BV 64, so 64.
    "recurrent_fwd": {"64": C(block_v=64, num_warps=4), "128": C(block_v=32, num_warps=2)},
    # Prefill at B1 T16384 H32: chunk 32, prep 0.42 ms + loaded forward 1.98 ms (chunk 16: 0.35 + 3.00).
    # At K = V = 128, the B4 T4096 H16 (64 pairs): chunk 16, prep 0.51 ms + loaded forward
    # 1.15 ms (chunk 32: 0.51 + 1.31).
    # gluon at K = 128 (NOTES change 63): the Gluon build (kernels/gluon/prep.py chunk_prep_gluon_kernel,
    # 4 warps): B4 T4096 H16 training 4.36 -> 4.19 ms, prefill 1.25 -> 1.10 ms. The tune tool, narrowed
    # to this entry's Triton fields, picks it: 0.259 against 0.308 ms (tune-sm90-2026-11-27s-128-prep.json).
    "chunk_prep": {"64": C(chunk_size=32, block_k=32, num_warps=2, dot_precision="tf32"),
                   "128": C(chunk_size=16, block_k=32, num_warps=2, dot_precision="tf32", gluon=True)},
    # 3 stages at K = V = 64 (NOTES change 32; the sweep takes this launch shape too): B1 T16384 H32
    # training 8.17 -> 7.52 ms, prefill 2.60 -> 2.34 ms (2 stages: 7.77 and 2.42).
    # gluon at K = V = 128 (NOTES changes 60, 62): the Gluon loaded forward (kernels/gluon/loaded_walks.py
    # chunk_fwd_loaded_gluon_kernel, its own 4 warps and V blocks of 64): B4 T4096 H16 training 5.34 ->
    # 4.99 ms, prefill 1.60 -> 1.47 ms at 8 warps; 4 warps then 1.48 -> 1.25 ms. The tune tool picks it:
    # 0.783 against 1.162 ms (tune-sm90-2026-11-27s-128-fwd-loaded.json).
    "chunk_fwd_loaded": {"64": C(chunk_size=32, block_v=16, num_warps=4, num_stages=3, dot_precision="tf32"),
                         "128": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32", gluon=True)},
    # Chunk transitions (NOTES change 36), B1 T16384 H32, hand-run sweep (.exp-style script, numbers in
    # NOTES): the transitions at 2 warps 0.83-0.86 ms (4 warps 1.05, 8 warps 1.76; chunk 64 1.56 at
    # best); the walk at BV 16, 2 warps, 4 stages 0.43 ms (3 stages 0.44, 4 warps 0.48-0.55) and the
    # state-gradient sweep at that shape 0.36 ms (4 warps 1.0). Not used at K = V = 128 (slower there).
    "chunk_transition": {"64": C(chunk_size=32, block_k=32, num_warps=2, dot_precision="tf32")},
    "chunk_fwd_transition": {"64": C(block_v=16, num_warps=2, num_stages=4, dot_precision="tf32")},
    # The segmented backward (NOTES change 24) gets its programs from segments of the sequence, so
    # one V block wins: training B1 T16384 H32 10.72 ms at BV 64 (BV 32: 12.63 at 4 warps, 14.01 at
    # 8), peak 1.12 GB against 2.53 GB at BV 32; K = V = 128, B4 T4096 H16: 12.51 ms at BV 128
    # against 14.62 at BV 64. Hand-run sweep, benchmarks/results-h100-2026-11-27e-segments.json.
    # bf16 operands since NOTES change 43, from the tune tool: K = 64 (B1 T16384 H32)
    # tune-sm90-2026-11-27-bf16-split64.json, 5.02 ms (tf32) -> 3.97 ms at 3 stages; K = 128
    # (B4 T4096 H16) tune-sm90-2026-11-27-bf16-split128.json, 10.55 -> 6.32 ms at BV 128.
    # gluon at K = V = 128 (NOTES changes 58, 59, 65): the K-split Gluon gradient kernel
    # (kernels/gluon/backward_ksplit.py chunk_bwd_ksplit_gluon_kernel), U kept by the forward, dZ and dv from
    # the Gluon sweep (its dS products at this entry's bf16). B4 T4096 H16 training 7.95 -> 5.47 ms,
    # the gradient kernel 4.64 -> 1.51 ms (hand-run scripts, numbers in NOTES). With the rest of
    # head 128's two-pass kernels in Gluon: 3.89 ms against fla-core's 7.99 (2.05x,
    # results-h100-2026-11-27s.json). The tune tool, narrowed to this entry's Triton fields, picks it:
    # sweep, rebuild and gradients 2.71 ms against 6.27 (Triton, no U) and 6.85 (Triton, U)
    # (tune-sm90-2026-11-27s-128-bwd-split.json). The Gluon kernel keeps U by itself
    # (launch.keeps_u), so keep_u stays off: where it cannot run (float32 inputs, RWKV_BACKENDS_GLUON=0)
    # the Triton kernel runs with this entry and without U, its faster form at that shape (7.93
    # against 8.58 ms with U, change 45).
    "chunk_bwd_split": {"64": C(chunk_size=16, block_v=64, num_warps=8, num_stages=3, dot_precision="bf16"),
                        "128": C(chunk_size=16, block_v=128, num_warps=8, num_stages=2, dot_precision="bf16",
                                 gluon=True)},
    # The recompute gets its programs from the segments, so one V block (the chunk matrices built
    # once, not once per block): B1 T16384 H32 training 9.76 ms at BV 16, 8.79 at BV 32, 8.25 at
    # BV 64 (results-h100-2026-11-27f-segments.json). At K = V = 128 the forward's chunk size is
    # the backward's, so the recompute loads the forward's matrices: BV 64, as the loaded forward.
    "chunk_recompute": {"64": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32"),
                        "128": C(chunk_size=16, block_v=64, num_warps=4, dot_precision="tf32")},
    # The tune tool's runners for the two kernels above, on the H100 (session 13): K = 64,
    # tune-sm90-2026-11-27-segmented64.json (chunk_bwd_split 5.62 ms at these shapes, chunk_recompute
    # 5.56, each within noise of the fastest); K = 128, chunk_bwd_split at B4 T4096 H16: 11.27 ms at
    # this entry, 13.0 ms at BV 64 (NOTES). chunk_recompute at K = 128 is not swept.
    # With the Triton gradient kernel, U did not pay at K = V = 128: B4 T4096 H16 training 7.93 ->
    # 8.58 ms (results-h100-2026-11-27-u.json); the one-pass chunk_bwd 128 entry keeps it off.
}

TABLES = {
    "sm90": _SM90,
    "default": _DEFAULT,
}

PROVENANCE = {
    "sm90": "measured on an H100 80GB HBM3 (torch 2.11.0+cu130, Triton 3.6.0, 2026-11-27); "
            "chunk_fwd and chunk_bwd at K,V <= 128 not swept (the 64 bucket's shapes); the two-pass "
            "kernels at K = V = 128 from hand-run experiments on that H100 (NOTES changes 58-66); every "
            "Gluon kernel ran on that H100 (the K = 64 gradient kernel also on an H200), their T = 1 "
            "fallback to Triton too",
    "default": "untuned starting point, not measured on a card; head 128's gradient kernels sized by "
               "compile_check to fit 101,376 B of shared memory",
}
