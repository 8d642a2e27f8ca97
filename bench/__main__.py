"""
make bench: every speed figure of BENCHMARKS.md, each section measuring its contenders side by side.

    python -m bench                      # all sections
    python -m bench kernels cpu_recipe   # some
"""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTIONS = ["kernels", "cpu_recipe", "dit_reference", "dit_sizes", "dit_options", "train", "sample"]

for section in sys.argv[1:] or list(SECTIONS):
    if section not in SECTIONS:
        print(f"error: unknown bench section {section!r}: expected one of {', '.join(SECTIONS)}", file=sys.stderr)
        raise SystemExit(2)
    if not os.path.exists(os.path.join(os.path.dirname(__file__), f"{section}.py")):
        continue
    print(f"\n## {section}\n", flush=True)
    sys.argv = [f"bench/{section}.py"]  # each section parses its own (empty) command line
    runpy.run_module(f"bench.{section}", run_name="__main__")
