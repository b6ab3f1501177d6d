"""No module of the package grows past 360 lines: a longer one is split by concern (with re-exports where
its public names are imported elsewhere), so that each file can be read in one sitting."""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_pz"
MAX_LINES = 360


def line_count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def test_no_module_is_longer_than_the_limit():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50, f"found only {len(modules)} modules under {PACKAGE}"
    offenders = [(p.relative_to(PACKAGE.parent).as_posix(), n) for p in modules if (n := line_count(p)) > MAX_LINES]
    assert not offenders, (f"{len(offenders)} module(s) over {MAX_LINES} lines (split them by concern):\n"
                           + "\n".join(f"  {name}: {n} lines" for name, n in offenders))
