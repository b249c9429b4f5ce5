"""The real-data paths through real algorithms: ResNet-18 on CIFAR-10 pickle batches (with
on-device crop/flip) and GPT-2 + LoRA on E2E csv (language modelling, FSL-SAGE alignment through
transformer blocks). Files are tiny and written here in their standard formats."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import demo_config
from test_data import write_cifar10, write_e2e_csv

from fslsage.experiment import LocalRuntime, prepare, run_experiment
from fslsage.models import communicated_state

TINY_GPT2 = {"n_layer": 3, "n_embd": 32, "n_head": 2, "client_layers": 1, "aux_layers": 1}


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v1"])
def test_resnet18_on_cifar10_files(tmp_path, algorithm):
    write_cifar10(tmp_path)
    cfg = demo_config(algorithm=algorithm, model="resnet18", dataset="cifar10",
                      data_dir=str(tmp_path), download=False, num_clients=2, batch_size=4,
                      rounds=2, align_interval=2, align_epochs=2, partition="iid")  # fmt: skip
    df = run_experiment(cfg, LocalRuntime(prepare(cfg)), progress=None)
    assert len(df) == 2 and df.test_loss.map(math.isfinite).all()
    assert df.comm_gib.iloc[-1] > 0


@pytest.mark.parametrize("algorithm", ["fsl_sage", "cse_fsl", "splitfed_v2", "fedavg"])
def test_gpt2_lora_on_e2e_files(tmp_path, algorithm):
    write_e2e_csv(tmp_path)
    cfg = demo_config(algorithm=algorithm, model="gpt2", dataset="e2e", data_dir=str(tmp_path),
                      download=False, dataset_args={"seq_len": 96}, model_args=TINY_GPT2,
                      partition="iid", num_clients=2, batch_size=2, rounds=2, align_interval=2,
                      align_epochs=2, first_align_round=1)  # fmt: skip
    runtime = LocalRuntime(prepare(cfg))
    lora_before = {k: v.clone() for k, v in runtime.global_weights["client_model"].items()}
    df = run_experiment(cfg, runtime, progress=None)
    assert len(df) == 2 and df.test_loss.map(math.isfinite).all()
    # only LoRA weights travel and train for split models
    for key, value in runtime.global_weights["client_model"].items():
        assert "lora_" in key or algorithm == "fedavg"
        if "lora_B" in key:  # B starts at zero: training moved it
            assert not torch.equal(value, lora_before[key])
    client = runtime.clients[0].parts["client_model"]
    assert set(communicated_state(client)) == set(runtime.global_weights["client_model"])
    if algorithm == "fsl_sage":
        assert df.align_loss.iloc[0] > 0  # round 1 aligns
