"""Coverage-guided fuzzing of the link's parsers with Atheris (reliability B-1, nightly).

    .venv/bin/python tests/fuzz/fuzz_link.py -max_total_time=600    # the nightly 10 min
    .venv/bin/python tests/fuzz/fuzz_link.py -runs=20000            # a quick look

Targets and invariants: ``tests/fuzz/targets.py``. A crash prints the input and writes it
to ``crash-*`` in the working directory; replay it with ``python tests/fuzz/fuzz_link.py
crash-...``. Extra arguments are libFuzzer's (``-help=1`` lists them).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

with atheris.instrument_imports(include=["tunnel"]):
    from tests.fuzz.targets import SEEDS, one_input


CORPUS = Path(__file__).resolve().parents[2] / ".cache" / "fuzz-corpus"
"""Where libFuzzer keeps the inputs it found interesting (git-ignored), seeded from SEEDS."""


def main() -> None:
    logging.disable(logging.CRITICAL)  # every refused input logs a line: millions of them
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus or crash file given
        CORPUS.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(SEEDS):
            (CORPUS / f"seed-{i}").write_bytes(seed)
        argv.append(str(CORPUS))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
