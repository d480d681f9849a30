"""gped's benchmark suite (issue 6): every figure a ratio measured side by side in one run.

* :mod:`bench.transport` — parameter snapshots and target batches through gped's wire
  (``Channel`` + encode/decode over real PUB/SUB sockets on loopback TCP) against raw pyzmq
  ``send_multipart(copy=False)`` of the same bytes over the same socket types.
* :mod:`bench.sampler_throughput` — the sampler's SGLD steps/s over its streaming phase with 0, 1,
  2 (and 4) students attached, in both modes, the sampler pinned to a core of its own.
* :mod:`bench.end_to_end` — ``gped run`` against ``gped reference`` for the same steps and student
  updates, wall time and student quality side by side.
* :mod:`bench.memory` — peak resident memory of every role, and how U_o tables, the number of
  students and model size grow it.

``python -m bench.run_all --quick --out bench-results.json`` runs them all and prints the table;
``bench/gpu_check.sh`` does the same with sampler and students on CUDA.  None of this is a test:
``tests/test_bench.py`` only checks that each benchmark runs and writes the fields it promises.
"""
