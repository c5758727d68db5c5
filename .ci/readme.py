"""The README's two quick-start commands, as CI runs them: `python3 .ci/readme.py JOB PART`.

JOB is `demo` (the main job's line, ending in `gallop demo`) or `tests` (ending in `python -m
pytest -q`); PART is `setup` (everything before the last ` && `: the set-up a newcomer types) or
`run` (the last command). Each line is read from README.md's "Quick start" section, so CI runs
what the README says, as written; a README without exactly one such line fails here.
"""

from __future__ import annotations

import pathlib
import sys

ENDS = {"demo": "gallop demo", "tests": "python -m pytest"}


def quick_start_commands(readme: str) -> list[str]:
    start = readme.index("## Quick start")
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end >= 0 else None]
    return [line.strip() for line in section.splitlines() if line.startswith("    pip install ")]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ENDS or argv[1] not in ("setup", "run"):
        print("usage: python3 .ci/readme.py {demo,tests} {setup,run}", file=sys.stderr)
        return 2
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    job, part = argv
    lines = [c for c in quick_start_commands(readme) if c.rsplit(" && ", 1)[-1].startswith(ENDS[job])]
    if len(lines) != 1:
        print(f"README.md's Quick start must have exactly one command ending in `{ENDS[job]}`, found {len(lines)}",
              file=sys.stderr)
        return 1
    setup, run = lines[0].rsplit(" && ", 1)
    print(setup if part == "setup" else run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
