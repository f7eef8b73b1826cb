"""The job spec: YAML -> validated pydantic models, a union keyed by ``kind``.

``kinds.py``   the job-kind contract: each spec class registers its kind (runner, resume, sweep trials)
``loading.py`` YAML, ``--set`` overrides, every problem at once (``problems.py`` words them)
``space.py``   search-space distributions, shared with the sweep runner
one module per kind: ``train``, ``sweep``, ``deploy``, ``rl``, ``compress``, ``robustness``; ``sections.py``
what they share.
"""

from deepyard.spec import compress, deploy, rl, robustness, sweep, train  # noqa: F401  (each registers its job kind)
from deepyard.spec.compress import CompressJob
from deepyard.spec.deploy import DeployJob
from deepyard.spec.kinds import KINDS, JobKind
from deepyard.spec.loading import apply_overrides, flatten, load_spec, parse_spec, to_yaml
from deepyard.spec.rl import RLJob
from deepyard.spec.robustness import RobustnessJob
from deepyard.spec.sections import JobBase
from deepyard.spec.space import DISTRIBUTIONS, sample_values
from deepyard.spec.sweep import SweepJob
from deepyard.spec.train import TrainJob

sweep.bind_bases()

__all__ = ["DISTRIBUTIONS", "KINDS", "CompressJob", "DeployJob", "JobBase", "JobKind", "RLJob", "RobustnessJob",
           "SweepJob", "TrainJob", "apply_overrides", "flatten", "load_spec", "parse_spec", "sample_values", "to_yaml"]
