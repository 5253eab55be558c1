"""The `rwkv-backends` console script: `rwkv-backends doctor ...`, `rwkv-backends conformance ...`."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"doctor": "rwkv_backends.doctor", "conformance": "rwkv_backends.conformance.__main__",
                "tune": "rwkv_backends.tune"}
    if not argv or argv[0] not in commands:
        print(f"usage: rwkv-backends {{{','.join(commands)}}} [options]  (each takes --help)")
        return 2
    import importlib
    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
