"""Model registry, split shapes, meta-device builds and what each part communicates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from fslsage.data.base import CLASSIFICATION, LANGUAGE_MODELING, DatasetInfo
from fslsage.models import (
    MODELS,
    ModelArgError,
    build_model,
    communicated_state,
    cut_shape,
    model_arg_names,
    state_bytes,
)
from fslsage.models.resnet import AUX_VARIANTS
from fslsage.registry import UnknownNameError

CIFAR10 = DatasetInfo("cifar10", CLASSIFICATION, 10, (3, 32, 32), 50000, 10000)
FMNIST = DatasetInfo("fmnist", CLASSIFICATION, 10, (1, 28, 28), 60000, 10000)
DIGITS = DatasetInfo("digits", CLASSIFICATION, 10, (1, 8, 8), 1500, 297)
TINY_LM = DatasetInfo("tiny_lm", LANGUAGE_MODELING, 257, (16,), 64, 16)
TINY_GPT2 = {"n_layer": 4, "n_embd": 32, "n_head": 2, "client_layers": 1, "aux_layers": 1}

# name -> (dataset, model_args, cut shape)
CASES = {
    "resnet18": (CIFAR10, {}, (128, 4, 4)),
    "simple_conv": (CIFAR10, {}, (2304,)),
    "alexnet_gas": (CIFAR10, {}, (64, 8, 8)),
    "digits_cnn": (DIGITS, {}, (32, 4, 4)),
    "gpt2": (TINY_LM, TINY_GPT2, (16, 32)),
}
OTHER_TASK = {CLASSIFICATION: TINY_LM, LANGUAGE_MODELING: CIFAR10}


def batch(info: DatasetInfo, n: int = 2) -> torch.Tensor:
    if info.task == LANGUAGE_MODELING:
        return torch.randint(0, info.num_classes, (n, *info.input_shape))
    return torch.randn(n, *info.input_shape)


def logits_shape(info: DatasetInfo, n: int = 2) -> tuple[int, ...]:
    if info.task == LANGUAGE_MODELING:
        return (n, info.input_shape[0], info.num_classes)
    return (n, info.num_classes)


def test_every_registered_model_has_a_case():
    assert set(MODELS.names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_shapes_of_client_server_and_aux(name):
    info, args, cut = CASES[name]
    split = build_model(name, info, **args)
    assert cut_shape(split, info) == cut
    z = split.client(batch(info))
    assert tuple(z.shape) == (2, *cut)
    assert tuple(split.server(z).shape) == logits_shape(info)
    assert tuple(split.aux(z.detach()).shape) == logits_shape(info)


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_on_meta_with_the_same_shapes_and_bytes(name):
    info, args, cut = CASES[name]
    real = build_model(name, info, **args)
    with torch.device("meta"):
        split = build_model(name, info, **args)
    for real_part, part in zip(
        (real.client, real.server, real.aux), (split.client, split.server, split.aux), strict=True
    ):
        assert all(t.is_meta for t in [*part.parameters(), *part.buffers()])
        assert state_bytes(part) == state_bytes(real_part) > 0
    assert cut_shape(split, info) == cut


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_model_arg_names_it_and_the_allowed_ones(name):
    info, args, _ = CASES[name]
    with pytest.raises(ModelArgError) as err:
        build_model(name, info, **args, no_such_arg=1)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    assert "no_such_arg" in str(err.value) and name in str(err.value)
    assert all(arg in str(err.value) for arg in model_arg_names(name))


def test_model_arg_typo_gets_a_suggestion():
    with pytest.raises(ModelArgError, match="did you mean 'aux_variant'"):
        build_model("resnet18", CIFAR10, aux_varient="half")


@pytest.mark.parametrize("name", sorted(CASES))
def test_incompatible_dataset_is_a_value_error_naming_model_and_dataset(name):
    info, args, _ = CASES[name]
    other = OTHER_TASK[info.task]
    with pytest.raises(ValueError, match=f"{name}.*{other.name}"):
        build_model(name, other, **args)


def test_images_too_small_for_the_kernels_are_a_value_error():
    with pytest.raises(ValueError, match="simple_conv.*digits"):
        build_model("simple_conv", DIGITS)


def test_unknown_model_name():
    with pytest.raises(UnknownNameError, match="resnet18"):
        build_model("resnet19", CIFAR10)


def test_resnet18_communicates_its_whole_state_dict():
    split = build_model("resnet18", CIFAR10)
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    expected = sum(t.numel() * t.element_size() for t in reference.values())
    # hand count: 11,181,642 float32 parameters; 20 BatchNorms over 4,800 channels with float32
    # running mean and variance and an int64 num_batches_tracked each
    assert expected == 11_181_642 * 4 + 4_800 * 2 * 4 + 20 * 8
    assert state_bytes(split.client) + state_bytes(split.server) == expected
    for part in (split.client, split.server):
        assert communicated_state(part).keys() == part.state_dict().keys()
    assert "bn1.num_batches_tracked" in communicated_state(split.client)


def test_resnet18_other_channel_counts():
    split = build_model("resnet18", FMNIST)
    assert cut_shape(split, FMNIST) == (128, 4, 4)
    assert split.server(split.client(batch(FMNIST))).shape == (2, 10)


@pytest.mark.parametrize("variant", AUX_VARIANTS)
def test_resnet18_aux_variants(variant):
    split = build_model("resnet18", CIFAR10, aux_variant=variant)
    assert split.aux(torch.randn(3, 128, 4, 4)).shape == (3, 10)


def test_resnet18_aux_variant_sizes_are_ordered():
    size = {
        v: state_bytes(build_model("resnet18", CIFAR10, aux_variant=v).aux) for v in AUX_VARIANTS
    }
    assert size["pooled_linear"] < size["linear"] < size["half"] < size["layer"] < size["full"]


def test_unknown_aux_variant():
    with pytest.raises(ValueError, match="aux_variant.*allowed: layer"):
        build_model("resnet18", CIFAR10, aux_variant="huge")


def test_cut_shape_leaves_batchnorm_statistics_alone():
    split = build_model("resnet18", CIFAR10)
    before = copy.deepcopy(split.client.state_dict())
    cut_shape(split, CIFAR10)
    after = split.client.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_bytes_counts_a_shared_tensor_once():
    shared = nn.Linear(4, 4, bias=False)
    module = nn.Sequential(shared, shared)
    assert len(communicated_state(module)) == 2
    assert state_bytes(module) == 16 * 4


def test_frozen_parameters_are_not_communicated():
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    module[0].weight.requires_grad_(False)
    assert set(communicated_state(module)) == {
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }


def test_digits_cnn_learns_digits():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    x, y = (x - x.mean()) / x.std(), torch.tensor(digits.target)
    perm = torch.randperm(len(y))
    train, test = perm[:1500], perm[1500:]
    split = build_model("digits_cnn", DIGITS)
    model = nn.Sequential(split.client, split.server)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for idx in train.split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert accuracy > 0.95


# --- GPT-2 -----------------------------------------------------------------------------------


def tiny_lm(attn_implementation: str = "sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4,
        n_embd=32,
        n_head=2,
        vocab_size=257,
        n_positions=16,
        bos_token_id=256,
        eos_token_id=256,
        attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(config).eval()


def split_logits(split, x: torch.Tensor) -> torch.Tensor:
    split.client.eval()
    split.server.eval()
    with torch.no_grad():
        return split.server(split.client(x))


def test_gpt2_only_lora_trains_and_travels_in_client_and_server():
    split = build_model("gpt2", TINY_LM, **TINY_GPT2)
    for part, blocks in ((split.client, 1), (split.server, 3)):
        trainable = [n for n, p in part.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        state = communicated_state(part)
        assert set(state) == set(trainable)
        # rank 4 on q and v: (A: 4×32 + B: 32×4) × 2 per block, float32
        assert state_bytes(part) == blocks * 2 * (2 * 4 * 32) * 4
    aux_frozen = [n for n, p in split.aux.named_parameters() if not p.requires_grad]
    assert aux_frozen == ["lm_head.weight"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_split_equals_the_unsplit_model_while_lora_b_is_zero(attn):
    from fslsage.models.gpt2 import split_gpt2

    lm = tiny_lm(attn)
    reference = copy.deepcopy(lm)
    split = split_gpt2(lm, client_layers=1, aux_layers=1)
    x = batch(TINY_LM, 3)
    with torch.no_grad():
        expected = reference(x).logits
    torch.testing.assert_close(split_logits(split, x), expected)
    # causal: changing a later token leaves earlier positions alone
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 257
    changed = split_logits(split, x2)
    torch.testing.assert_close(changed[:, :10], expected[:, :10])
    assert not torch.allclose(changed[:, 10:], expected[:, 10:])


def test_gpt2_loads_pretrained_weights_from_a_local_directory(tmp_path):
    lm = tiny_lm()
    lm.save_pretrained(tmp_path)
    split = build_model("gpt2", TINY_LM, pretrained=str(tmp_path), client_layers=2, aux_layers=1)
    x = batch(TINY_LM, 2)
    with torch.no_grad():
        expected = lm(x).logits
    torch.testing.assert_close(split_logits(split, x), expected)
    with torch.device("meta"):  # dry run: the config alone, no weights read
        meta = build_model("gpt2", TINY_LM, pretrained=str(tmp_path), client_layers=2)
    assert cut_shape(meta, TINY_LM) == (16, 32)
    assert state_bytes(meta.server) == state_bytes(split.server)

    bigger_vocab = DatasetInfo("lm", LANGUAGE_MODELING, 50257, (16,), 1, 1)
    with pytest.raises(ValueError, match="vocabulary of 257"):
        build_model("gpt2", bigger_vocab, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="n_layer"):
        build_model("gpt2", TINY_LM, pretrained=str(tmp_path), n_layer=12)
    with pytest.raises(ValueError, match="cannot load pretrained"):
        build_model("gpt2", TINY_LM, pretrained=str(tmp_path / "missing"))


def test_gpt2_defaults_to_gpt2_medium():
    with torch.device("meta"):
        split = build_model("gpt2", TINY_LM)
    assert len(split.client.blocks) == 1 and len(split.server.blocks) == 23
    assert len(split.aux.blocks) == 3 and cut_shape(split, TINY_LM) == (16, 1024)
    # LoRA rank 4 on q and v of 1024×1024: 4·1024·2 per matrix, 2 matrices per block
    per_block = 2 * (2 * 4 * 1024) * 4
    assert state_bytes(split.client) == per_block
    assert state_bytes(split.server) == 23 * per_block
    block_params = sum(math.prod(p.shape) for p in split.server.blocks[0].parameters())
    assert block_params == 12 * 1024**2 + 13 * 1024 + per_block // 4
