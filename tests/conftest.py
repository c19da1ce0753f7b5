import os

import pytest
import torch

# Triton's interpreter must be chosen before triton is first imported; without a GPU it is the only
# way the real kernel code runs, so tests marked `triton` exercise it on CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# Example counts of tests without their own: `deep` draws DEEP_SCALE times what `ci` draws.
CI_EXAMPLES = 25
DEEP_SCALE = 10

# Not derandomized: every run draws new examples, so the suite explores more over time. A failure
# prints the seed (`--hypothesis-seed=N` reproduces it) and the example blob, and failing examples are
# kept in the local example database (.hypothesis/) and replayed first on the next run.
_exploring = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("ci", max_examples=CI_EXAMPLES, **_exploring)
# On demand (HYPOTHESIS_PROFILE=deep): ten times every count, `examples(n)` included.
settings.register_profile("deep", max_examples=DEEP_SCALE * CI_EXAMPLES, **_exploring)
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=list(HealthCheck))
# Mutation testing (scripts/mutation.sh): few examples and the same ones on every run (derandomized, so
# no example database either), so a mutant's verdict does not depend on the run.
settings.register_profile(
    "mutation", deadline=None, max_examples=10, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """The example count of a property test that `ci` runs with ``n`` examples, under the active profile.

    The deep property tests of the ops (``@settings(max_examples=examples(500))``) go through this one
    function, so that `deep` scales them with everything else, while `dev` and `mutation` keep to their own
    small count (a mutation run reruns the tests once per mutant).
    """
    if PROFILE == "ci":
        return n
    if PROFILE == "deep":
        return DEEP_SCALE * n
    return min(n, settings.get_profile(PROFILE).max_examples)


@pytest.fixture
def float64_default():
    """Runs a test under torch.set_default_dtype(torch.float64) (users do change it): results and
    output dtypes must not depend on the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def meta_default_device():
    """Runs a test under torch.set_default_device("meta"): every buffer an op makes must follow its
    inputs' device (a stand-in, on a CPU machine, for a CUDA default device)."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
