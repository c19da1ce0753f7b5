import os

import torch

# Triton's interpreter must be chosen before triton is first imported; without a GPU it is the only
# way the real kernel code runs, so tests marked `triton` exercise it on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Not derandomized: every run draws new examples, so the suite explores more over time. A failure
# prints the seed (`--hypothesis-seed=N` reproduces it) and the example blob, and failing examples are
# kept in the local example database (.hypothesis/) and replayed first on the next run.
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=list(HealthCheck))
# Mutation testing (scripts/mutation.sh): few examples and the same ones on every run (derandomized, so
# no example database either), so a mutant's verdict does not depend on the run.
settings.register_profile(
    "mutation", deadline=None, max_examples=10, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
