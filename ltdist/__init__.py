"""ltdist: distributed long-tailed image recognition (KT and MPCL + MPFA).

Importing the package is cheap and works without the compiled extension; ops that need
``ltdist._C`` call :func:`ltdist.extension.load_extension`, which explains how to build it.

Layers import downward only (:data:`LAYERS`, lowest first; ``tests/test_import_layers.py`` checks every
import, lazy ones included). A module may import its own layer and the layers below it:

- **leaf**: helpers every layer shares and that import no other layer: files (``fileio``), ranks
  (``distributed``), the stall watchdog, the preemption flag the trainer polls at step boundaries, log
  heartbeats, class groups and count bins (data checks them, training validates by them, evaluate reports
  them), the label-range check, the run directory's shared paths, and the custom ops (``ltdist.kernels``).
- **data** ← **models** (the weights record hashes its file with ``data.index.file_sha256``) ← **engine** (it
  receives the training objective from the train stage and calls it through
  :class:`ltdist.engine.objective.TrainingObjective`) ← **methods** (objectives and stage-2 classifiers) ←
  **evaluate** (the comparison reads what each method chose on val from its classifier file).
- **config** sits above those: it composes sections that methods own (the decoupling baselines' dataclasses)
  and validates values against the registries of data, models, engine and methods (meta-set sources,
  architectures, memory formats, objectives). Nothing below reads the schema; stages receive the resolved
  ``DictConfig``.
- **stages** (load inputs from the run directory → call a method → save outputs) ← **run** (launch, job,
  sweep, the run lock) ← **tools**: command-line entry points that drive the whole stack — the ``ltdist``
  console script, the benchmarks (``ltdist.bench``) and the GPU check (in ``ltdist.kernels``).
"""

__version__ = "0.1.0"

# (layer, modules) lowest first. A dotted name covers that module and, for a package, all of it (the most
# precise entry wins); the bare "ltdist" covers the package's __init__ only, so a new top-level module has
# to be placed here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaf", ("ltdist", "ltdist.fileio", "ltdist.distributed", "ltdist.watchdog", "ltdist.preemption",
              "ltdist.heartbeat", "ltdist.class_groups", "ltdist.count_bins", "ltdist.labels", "ltdist.rundir",
              "ltdist.extension", "ltdist.kernels")),
    ("data", ("ltdist.data",)),
    ("models", ("ltdist.models",)),
    ("engine", ("ltdist.engine",)),
    ("methods", ("ltdist.methods",)),
    ("evaluate", ("ltdist.evaluate",)),
    ("config", ("ltdist.config",)),
    ("stages", ("ltdist.stages",)),
    ("run", ("ltdist.launch", "ltdist.job", "ltdist.sweep", "ltdist.runlock")),
    ("tools", ("ltdist.cli", "ltdist.bench", "ltdist.kernels.compile_check", "ltdist.kernels.cuda_build_check",
               "ltdist.kernels.gpu_bundle", "ltdist.kernels.gpu_check", "ltdist.kernels.gpu_check_pipeline")),
)
