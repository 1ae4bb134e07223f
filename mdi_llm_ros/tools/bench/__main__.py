"""Child processes of the benchmark: python -m mdi_llm_ros.tools.bench --baseline | --drive | --divergence | --floor."""
import sys

from .baselines import baseline_main, divergence_main, floor_main
from .drive import drive_main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        return baseline_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        return drive_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--divergence":
        return divergence_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        return floor_main()
    print("use `mdi-llm bench`", file=sys.stderr)
    return 2


sys.exit(main())
