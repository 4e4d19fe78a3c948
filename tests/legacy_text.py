"""A small deterministic text for the legacy-run fixture (tests/data/run_3db2249): generated, so
no corpus is copied into the repository."""

import random

WORDS = ("the king queen lord lady sword crown night day love death fair foul heart blood "
         "speak hear come go thou thee thy my mine our good ill sweet bitter shall will").split()


def legacy_text(n_lines: int = 600) -> str:
    rng = random.Random(3)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        lines.append(" ".join(words).capitalize() + rng.choice(".,;!?"))
    return "\n".join(lines) + "\n"
