"""One runner per job kind, each registered beside its spec class (``spec/kinds.py``): ``check(spec)``
says what `deepyard validate` prints, ``run(spec, options)`` returns a ``summary.RunSummary``.
A kind that can be a sweep's base also has a trials module (``trials.py`` says what it provides).

Runner modules import lazily (``JobKind.runner_module``): they pull in Ray, which the CLI's validate
path and the GPU step bench (``runners.loop`` on a machine with PyTorch only) do not need.
"""
