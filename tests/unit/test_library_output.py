"""Library output (warnings, progress bars, stderr text) of a training run goes to its log file
(``logs.library_output``): held before the log file is known, and from child processes the run spawns.

In subprocesses: pytest's own capture of warnings and stderr would hide what a real command does."""
import logging
import subprocess
import sys
import textwrap

from megatron_pz.logs.library_output import STDERR, LibraryStream


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_progress_bar_leaves_its_final_state_one_line(tmp_path):
    from tqdm import tqdm

    got = Lines()
    STDERR.addHandler(got)
    try:
        stream = LibraryStream(sys.__stderr__)
        for _ in tqdm(range(300), desc="Converting tensors", file=stream, mininterval=0):
            pass
        stream.write("plain text\nwith two lines\n")
        stream.write("no newline yet")
        assert got.lines[-2:] == ["plain text", "with two lines"]
        stream.finish()
    finally:
        STDERR.removeHandler(got)
    assert len(got.lines) == 4 and got.lines[0].startswith("Converting tensors: 100%") and "300/300" in got.lines[0]
    assert got.lines[-1] == "no newline yet"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


HELD = """
import sys, warnings
from tqdm import tqdm
from megatron_pz.logs import configure_console, say
from megatron_pz.logs.library_output import hold, release
hold()
warnings.warn("raised while the config is read", FutureWarning)
for _ in tqdm(range(3), desc="a library's bar"):
    pass
if sys.argv[1] == "run":
    configure_console(sys.argv[2], 0)
    say("model    tiny")
    warnings.warn("raised during the run")
release()
print("megatron-pz train: error: the command's own line", file=sys.stderr)
"""


def test_held_library_output_goes_to_the_log_file_once_it_exists(tmp_path):
    p = run(HELD, "run", str(tmp_path))
    assert p.stdout == "model    tiny\n"
    assert p.stderr == "megatron-pz train: error: the command's own line\n"
    log = (tmp_path / "train.log").read_text()
    for text in ("FutureWarning: raised while the config is read", "a library's bar: 100%", "3/3",
                 "UserWarning: raised during the run", "model    tiny"):
        assert text in log, text
    assert log.index("raised while the config is read") < log.index("model    tiny")


def test_held_output_is_printed_when_the_command_fails_before_its_log_file(tmp_path):
    """Nothing is lost: a config error still shows the warning that came before it, as without holding."""
    p = run(HELD, "fail")
    err = p.stderr.splitlines()
    assert any("FutureWarning: raised while the config is read" in line for line in err), err
    assert any(line.startswith("a library's bar: 100%") for line in err)
    assert err[-1] == "megatron-pz train: error: the command's own line"


SPAWN = """
import sys
sys.path.insert(0, sys.argv[2])
from megatron_pz.logs import configure_console
from megatron_pz.parallel import spawn_local
configure_console(sys.argv[1], 0)
import warner
spawn_local(warner.work, 1)
"""
WARNER = '''
import sys, warnings
warnings.warn("warner: raised while its module is imported (as Megatron does)")


def work():
    from tqdm import tqdm
    warnings.warn("warner: raised while it works", FutureWarning)
    for _ in tqdm(range(3), desc="warner bar"):
        pass
    print("warner: a line on stderr", file=sys.stderr)
'''


def test_warnings_of_a_spawned_child_process_go_to_the_runs_log_file(tmp_path):
    """``parallel.spawn_local`` (the first-use smollm2 conversion inside a run): the child imports the package
    before its work, which sends its warnings, bars and stderr text to the run's log file."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "warner.py").write_text(WARNER)
    p = run(SPAWN, str(tmp_path / "run"), str(tmp_path / "mod"))
    assert "warner" not in p.stdout + p.stderr and "Warning" not in p.stderr, p.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    for text in ("FutureWarning: warner: raised while it works", "warner bar: 100%", "warner: a line on stderr"):
        assert text in log, text
    # imported by this process, then by the child before its work
    assert log.count("UserWarning: warner: raised while its module is imported") == 2, log
