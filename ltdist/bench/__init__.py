"""The benchmarks, one module per benchmark on one harness (:mod:`ltdist.bench.harness`).

Each is ``ltdist bench NAME`` (or ``python -m ltdist.bench.MODULE``) and writes ``--out DIR/results.json``
and ``DIR/table.txt``:

- ``kernels`` (:mod:`~ltdist.bench.kernels`, cases in :mod:`~ltdist.bench.kernel_cases`): the custom ops
  (Triton / C++ / CUDA) against eager PyTorch, torch.compile and op baselines;
- ``engine`` (:mod:`~ltdist.bench.engine`): a DeepSpeed step against a plain PyTorch step;
- ``engine-dist`` (:mod:`~ltdist.bench.engine_dist`): R ranks, ZeRO 0/1/2 against DistributedDataParallel;
- ``objectives`` (:mod:`~ltdist.bench.objectives`): a stage-1 objective's step against a cross-entropy step;
- ``data`` (:mod:`~ltdist.bench.data`): the training stream against a map-style DataLoader;
- ``mpfa`` (:mod:`~ltdist.bench.mpfa`): MPFA's memory and generation throughput at iNaturalist scale;
- ``scale`` (:mod:`~ltdist.bench.scale`): every stage at two class counts, each in its own process tree.
"""
