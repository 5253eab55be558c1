"""The vendor tuning tables: data files per vendor and architecture, read here and nowhere else.

`rwkv_backends/<vendor>/tables/<arch>.json` holds the entries measured (or chosen) for one
architecture; `default.json` serves every architecture of that vendor without an entry of its own.
A file reads:

    {"schema": "rwkv-backends-tuning/1", "vendor": "nvidia", "arch": "sm90", "about": "...",
     "entries": {"<kernel role>": {"<head bucket>": {"config": {...}, "provenance": {...}}}}}

`config` holds `KernelConfig` fields (the ones the role reads, see config.KERNELS); `provenance`
says where the entry comes from: `card`, `torch`, `triton`, `date` (null where nothing was
measured), `run` (the tune run or sweep, or "default, not measured" / "default: not tuned on this
vendor"), `measured` (the figure, or null), and optionally `note`. `python -m rwkv_backends.tune
--write-table` writes entries in this form (`write_entries`). No sweep ever runs here.

`lookup` finds a role's entry for the device's architecture, then in the vendor's default file;
a role neither has raises `MissingEntry`, which the registry turns into the variant's refusal.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from dataclasses import dataclass
from importlib import resources

import torch

from .config import KERNELS, KernelConfig, head_bucket
from .device import DeviceInfo

SCHEMA = "rwkv-backends-tuning/1"
BUCKETS = ("64", "128")
PROVENANCE_KEYS = ("card", "torch", "triton", "date", "run", "measured")
DEFAULT_ARCH = "default"

# Float32 inputs must stay within 2e-5 (SPEC §2). Chunks of 32 do not in the strong-decay regime:
# state error 3.7e-5 on an H100 (full conformance tier, 2026-11-27); chunks of 16 give 2e-6.
FLOAT32_MAX_CHUNK = 16
# Float32 inputs double the backward's load staging in shared memory: at V block 128 (K = 128) the
# segmented backward asks for 247,808 B against the H100's 232,448 (conformance, 2026-11-27).
FLOAT32_MAX_BACKWARD_BLOCK_V = 64


class MissingEntry(LookupError):
    """No table entry (arch or default) for a kernel role at a head bucket; the message says which."""


class TableError(ValueError):
    """A tuning table file that does not follow the schema; the message names the file and the field."""


@dataclass(frozen=True)
class Entry:
    config: KernelConfig
    provenance: dict


# ---------------------------------------------------------------------------------------------
# Reading

def tables_package(vendor: str) -> str | None:
    """The vendor folder whose tables serve `vendor` (Hygon: AMD's), or None when it has none."""
    from .vendors import vendor_module
    module = vendor_module(vendor)
    if module is None:
        return None
    return getattr(module, "TABLES_FROM", module.__name__.rsplit(".", 1)[-1])


def _tables_dir(package: str):
    return resources.files(f"rwkv_backends.{package}").joinpath("tables")


def table_path(package: str, arch: str) -> str:
    """The file of `arch` in vendor folder `package` (which need not exist yet), as a path."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), package, "tables", f"{arch}.json")


def parse_table(doc: dict, where: str, vendor: str | None = None, arch: str | None = None) -> dict:
    """{role: {bucket: Entry}} from a table document, checked against the schema."""
    def fail(what):
        raise TableError(f"{where}: {what}")
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        fail(f"schema: expected {SCHEMA!r}, got {doc.get('schema') if isinstance(doc, dict) else doc!r}")
    for key, want in (("vendor", vendor), ("arch", arch)):
        if want is not None and doc.get(key) != want:
            fail(f"{key}: expected {want!r} (the file's place), got {doc.get(key)!r}")
    if not isinstance(doc.get("about"), str) or not doc["about"]:
        fail("about: expected a sentence on what the file covers")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        fail("entries: expected {role: {bucket: entry}}")
    fields = set(KernelConfig.__dataclass_fields__)
    out = {}
    for role, buckets in entries.items():
        if role not in KERNELS:
            fail(f"entries: unknown kernel role {role!r}; known: {', '.join(KERNELS)}")
        for bucket, entry in buckets.items():
            at = f"entries.{role}.{bucket}"
            if bucket not in BUCKETS:
                fail(f"{at}: head bucket expected one of {BUCKETS}")
            if not isinstance(entry, dict) or set(entry) - {"config", "provenance"}:
                fail(f"{at}: expected {{'config': ..., 'provenance': ...}}")
            config, prov = entry.get("config"), entry.get("provenance")
            if not isinstance(config, dict) or set(config) - fields:
                fail(f"{at}.config: expected KernelConfig fields, got {sorted(config) if isinstance(config, dict) else config!r}")
            try:
                cfg = KernelConfig.make(**config)
            except (TypeError, ValueError) as exc:
                fail(f"{at}.config: {exc}")
            if not isinstance(prov, dict) or [k for k in PROVENANCE_KEYS if k not in prov]:
                fail(f"{at}.provenance: expected the keys {', '.join(PROVENANCE_KEYS)}")
            if not isinstance(prov["run"], str) or not prov["run"]:
                fail(f"{at}.provenance.run: expected the tune run, or 'default, not measured'")
            out.setdefault(role, {})[bucket] = Entry(cfg, dict(prov))
    return out


@functools.lru_cache(maxsize=None)
def tables(package: str) -> dict:
    """{arch: {role: {bucket: Entry}}} from every file in `package`'s tables folder."""
    folder = _tables_dir(package)
    out = {}
    if not folder.is_dir():
        return out
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".json"):
            continue
        arch = item.name[:-len(".json")]
        where = f"rwkv_backends/{package}/tables/{item.name}"
        try:
            doc = json.loads(item.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TableError(f"{where}: not JSON ({exc})") from None
        out[arch] = parse_table(doc, where, vendor=package, arch=arch)
    return out


@functools.lru_cache(maxsize=None)
def about(package: str) -> dict:
    """{arch: the file's "about" sentence}."""
    folder = _tables_dir(package)
    if not folder.is_dir():
        return {}
    return {p.name[:-5]: json.loads(p.read_text(encoding="utf-8"))["about"]
            for p in folder.iterdir() if p.name.endswith(".json")}


def reload() -> None:
    """Forget the files read so far (after the tune tool writes one, or a test replaces one)."""
    tables.cache_clear()
    about.cache_clear()


# ---------------------------------------------------------------------------------------------
# Looking up

def _float32_limits(kernel, cfg, source, problem):
    """Float32 inputs: chunks no longer than FLOAT32_MAX_CHUNK (accuracy) and backward V blocks no
    wider than FLOAT32_MAX_BACKWARD_BLOCK_V (shared memory)."""
    if getattr(problem, "dtype", None) != torch.float32:
        return cfg, source
    if "chunk_size" in KERNELS.get(kernel, {}).get("uses", ()) and cfg.chunk_size > FLOAT32_MAX_CHUNK:
        cfg, source = cfg.with_(chunk_size=FLOAT32_MAX_CHUNK), f"{source}, chunk {FLOAT32_MAX_CHUNK} for float32 inputs"
    if kernel in ("chunk_bwd", "chunk_bwd_split") and cfg.block_v > FLOAT32_MAX_BACKWARD_BLOCK_V:
        cfg = cfg.with_(block_v=FLOAT32_MAX_BACKWARD_BLOCK_V)
        source = f"{source}, V block {FLOAT32_MAX_BACKWARD_BLOCK_V} for float32 inputs"
    return cfg, source


def find(device: DeviceInfo, kernel: str, bucket: str) -> tuple:
    """(Entry, "vendor/arch/kernel/bucket") for the device's architecture, else its vendor's default;
    raises MissingEntry naming what is absent."""
    package = tables_package(device.vendor)
    if package is None:
        raise MissingEntry(f"no tuning tables for vendor {device.vendor!r}")
    found = tables(package)
    if not found:
        raise MissingEntry(f"no tuning tables for {device.vendor} (rwkv_backends/{package}/tables/ holds no file)")
    for arch in (device.arch, DEFAULT_ARCH):
        entry = found.get(arch, {}).get(kernel, {}).get(bucket)
        if entry is not None:
            return entry, f"{package}/{arch}/{kernel}/{bucket}"
    raise MissingEntry(f"no tuning table entry for {kernel} at head {bucket} in {package}/{device.arch} "
                       f"or {package}/{DEFAULT_ARCH}")


def lookup(device: DeviceInfo, kernel: str, problem) -> tuple:
    """(config, source) for `kernel` on `device` at the problem's head size (and, for float32
    inputs, within `_float32_limits`); raises MissingEntry when no table has the role."""
    entry, source = find(device, kernel, head_bucket(problem.K, problem.V))
    return _float32_limits(kernel, entry.config, source, problem)


def entry_provenance(device: DeviceInfo, kernel: str, problem) -> dict:
    """The provenance record of the entry `lookup` takes."""
    return dict(find(device, kernel, head_bucket(problem.K, problem.V))[0].provenance)


def provenance(device: DeviceInfo) -> str:
    """One line on the table the device's plans read (the doctor's "tables")."""
    package = tables_package(device.vendor)
    if package is None:
        return "no vendor table"
    files = about(package)
    if not files:
        return f"{device.vendor}: no tuning tables (the Triton variants are refused)"
    arch = device.arch if device.arch in files else DEFAULT_ARCH
    text = files.get(arch, "no default table")
    return f"{package}/{arch}: {text}" + ("" if arch == DEFAULT_ARCH else f" (other roles: {package}/{DEFAULT_ARCH})")


# ---------------------------------------------------------------------------------------------
# Writing (the tune tool)

def config_fields(kernel: str, cfg: KernelConfig) -> dict:
    """The fields an entry stores: the ones the role reads, and any other that differs from the default."""
    uses = KERNELS[kernel]["uses"]
    default = KernelConfig().as_dict()
    return {name: value for name, value in cfg.as_dict().items()
            if name in uses or (name != "vendor_options" and value != default[name])
            or (name == "vendor_options" and value)}


def dumps_table(doc: dict) -> str:
    """A table document as the files hold it: one line per config, one per provenance field."""
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(doc[k])}," for k in ("schema", "vendor", "arch", "about")]
    lines.append('  "entries": {')
    roles = [r for r in KERNELS if r in doc["entries"]]
    for i, role in enumerate(roles):
        lines.append(f"    {json.dumps(role)}: {{")
        buckets = [b for b in BUCKETS if b in doc["entries"][role]]
        for j, bucket in enumerate(buckets):
            entry = doc["entries"][role][bucket]
            lines.append(f"      {json.dumps(bucket)}: {{")
            lines.append(f"        \"config\": {json.dumps(entry['config'])},")
            lines.append("        \"provenance\": {")
            prov = entry["provenance"]
            keys = [k for k in PROVENANCE_KEYS if k in prov] + sorted(k for k in prov if k not in PROVENANCE_KEYS)
            lines += [f"          {json.dumps(k)}: {json.dumps(prov[k], ensure_ascii=False)}"
                      + ("," if n < len(keys) - 1 else "") for n, k in enumerate(keys)]
            lines.append("        }")
            lines.append("      }" + ("," if j < len(buckets) - 1 else ""))
        lines.append("    }" + ("," if i < len(roles) - 1 else ""))
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def write_entries(path: str, vendor: str, arch: str, entries: dict, about_text: str | None = None) -> dict:
    """Merge `entries` ({role: {bucket: {"config": {...}, "provenance": {...}}}}) into the table file
    at `path` (created for `vendor` and `arch` when absent), replacing those roles' buckets and
    keeping every other entry.
    The result is checked against the schema before it is written. Returns the document."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        vendor, arch = doc.get("vendor"), doc.get("arch")      # a file keeps what it is (e.g. a default.json)
    else:
        doc = {"schema": SCHEMA, "vendor": vendor, "arch": arch,
               "about": about_text or f"entries written by python -m rwkv_backends.tune on {vendor} {arch}",
               "entries": {}}
    for role, buckets in entries.items():
        doc["entries"].setdefault(role, {}).update(buckets)
    parse_table(doc, path, vendor=vendor, arch=arch)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps_table(doc))
    reload()
    return doc


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()
