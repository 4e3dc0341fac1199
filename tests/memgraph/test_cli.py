"""The README's main job, ``memgraph demo``, as a user runs it: a fresh process, no Triton interpreter."""
import os
import subprocess
import sys


def test_demo_trains_like_eager_and_exits_zero():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MEMGRAPH_")}
    result = subprocess.run([sys.executable, "-m", "memgraph.cli", "demo", "--steps", "2", "--lora"],
                            capture_output=True, text=True, env=environment, timeout=600, cwd="/")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK: loss rel err" in result.stdout and "recomputed" in result.stdout


def test_bad_option_is_reported_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "memgraph.cli", "demo", "--solver", "fastest"],
                            capture_output=True, text=True, timeout=600, cwd="/")
    assert result.returncode == 2
    assert "not a registered solver; choose one of" in result.stderr and "Traceback" not in result.stderr
