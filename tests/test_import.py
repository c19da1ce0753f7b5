import subprocess
import sys


def test_import_touches_no_cuda_and_compiles_nothing():
    code = (
        "import sys, torch\n"
        "import fastrl_kernels as fk\n"
        "fk.PolicyLossConfig(); fk.policy_loss; fk.token_logprobs\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "for name in ('triton', 'fastrl_kernels.native', 'fastrl_kernels.triton', 'torch.utils.cpp_extension'):\n"
        "    assert name not in sys.modules, name + ' imported'\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_public_api_names_resolve():
    import fastrl_kernels as fk

    for name in ("token_logprobs", "policy_loss", "PolicyLossConfig", "PolicyLossOutput", "gae",
                 "group_advantages", "value_loss", "available_backends", "policy_loss_from_logprobs"):
        assert callable(getattr(fk, name)), name
