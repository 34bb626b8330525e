"""`python -m ring_ext plan`: predicts, for one attention layer on a cluster, the forward+backward time,
the bytes each rank sends and the peak memory per rank of every context-parallel scheme ring_ext can
run, best first (the plan). The model is docs/planner.md.

    model.py      the layer, the cluster, the schemes and the cost model (pure)
    presets.py    --gpu and --interconnect: public spec-sheet rates
    calibrate.py  --calibrate: this machine's kernel rate and Gloo link, measured
    report.py     the plan as a table and a plot
    command.py    the subcommand's arguments and run

    python -m ring_ext plan --seq 131072 --heads 32 --kv-heads 8 --gpu h100 --nodes 2
    python -m ring_ext plan --seq 131072 --heads 32 --nodes 2 --intra-gbps 400 --inter-gbps 50 --tflops 400
    python -m ring_ext plan --calibrate --seq 8192 --heads 8 --nodes 1 --gpus-per-node 2   # this machine (CPU)
"""

from .command import add_plan_arguments, run
from .model import DTYPES

__all__ = ["DTYPES", "add_plan_arguments", "run"]
