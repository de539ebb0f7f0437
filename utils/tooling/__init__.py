"""The tools around the course: the chapter builder (notebooks), the grader (grade), the benchmark (bench)
and the Binder files (binder). Each runs as `python -m utils.<tool>` (or `python -m utils.tooling.<tool>`);
only the benchmark, which times the models, imports torch.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the course's top folder: the one place it is worked out
