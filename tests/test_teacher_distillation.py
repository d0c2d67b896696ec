"""Teacher (logit) distillation healing: chunked KL equals the plain KL, a healing step lowers it, bad input is named."""

import lightning as L
import pytest
import torch
from conftest import make_tiny_model, random_ids
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaConfig

from lightning_prune.callbacks import StageCallback
from lightning_prune.data.datamodule import TextDataModule
from lightning_prune.errors import InputError
from lightning_prune.modules.healing import HealingModule
from lightning_prune.stages import PruneStage
from lightning_prune.teacher import TeacherDistillation, causal_lm_loss, distillation_kl, final_hidden


def plain_kl(student, teacher, ids, temperature=1.0, reverse=False):
    log_s = torch.log_softmax(student(input_ids=ids).logits / temperature, -1)
    log_t = torch.log_softmax(teacher(input_ids=ids).logits / temperature, -1)
    first, second = (log_s, log_t) if reverse else (log_t, log_s)
    return (first.exp() * (first - second)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize(("loss", "temperature", "chunk"), [("forward_kl", 1.0, 5), ("reverse_kl", 2.0, 7), ("forward_kl", 0.5, 1000)])
def test_chunked_kl_equals_the_plain_kl(loss, temperature, chunk):
    student, teacher = make_tiny_model("llama"), make_tiny_model("llama", seed=1)
    ids = random_ids(2, 16)
    chunked = distillation_kl(
        final_hidden(student, ids),
        final_hidden(teacher, ids),
        student.lm_head,
        teacher.lm_head,
        temperature=temperature,
        loss=loss,
        chunk_tokens=chunk,
    )
    torch.testing.assert_close(chunked, plain_kl(student, teacher, ids, temperature, reverse=loss == "reverse_kl"))
    same = distillation_kl(final_hidden(teacher, ids), final_hidden(teacher, ids), teacher.lm_head, teacher.lm_head, loss=loss)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_chunked_lm_loss_equals_the_hugging_face_loss():
    model, ids = make_tiny_model("qwen2"), random_ids(2, 16)
    expected = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(causal_lm_loss(final_hidden(model, ids), model.lm_head, ids, chunk_tokens=7), expected)


class KLProbe(L.Callback):
    """The distillation loss on one fixed batch at the start and at the end of training."""

    def __init__(self, batch):
        self.batch, self.values = batch, []

    def _measure(self, pl_module):
        with torch.no_grad():
            self.values.append(float(pl_module.distillation_losses(self.batch)[0]))

    def on_train_start(self, trainer, pl_module):
        self._measure(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._measure(pl_module)


def test_a_teacher_distillation_heal_lowers_the_kl_and_checkpoints_no_teacher(tiny_dir, tmp_path):
    L.seed_everything(0)
    data = TextDataModule(tokenizer=str(tiny_dir), seq_len=32, num_train_samples=8, calibration_samples=4, batch_size=4)
    data.setup("fit")
    probe = KLProbe(data.train_blocks[:4])
    module = HealingModule(
        model=str(tiny_dir),
        lora_rank=8,
        lora_dropout=0.0,
        learning_rate=2e-2,
        warmup_steps=1,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        distill=TeacherDistillation(alpha=0.9, temperature=2.0, chunk_tokens=16),
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        callbacks=[StageCallback([PruneStage(num_layers=2)], run_dir=str(tmp_path)), probe, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    before, after = probe.values
    assert after < 0.9 * before, probe.values
    assert module.teacher.config.num_hidden_layers == 6 and module.model.config.num_hidden_layers == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and not any(key.startswith("teacher.") for key in state)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"loss": "js"}, "choose one of forward_kl, reverse_kl"),
        ({"temperature": 0.0}, "temperature 0.0 must be > 0"),
        ({"alpha": 1.5}, "alpha 1.5 must be in [0, 1]"),
        ({"quantize": "int3"}, "quantize 'int3' is not known"),
    ],
)
def test_bad_distillation_settings_are_named(options, fragment):
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        HealingModule(model="demo", distill=TeacherDistillation(**options))


def test_a_teacher_with_another_vocabulary_is_refused(tiny_dir, tmp_path, tiny_tokenizer):
    other = tmp_path / "other"
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    module = HealingModule(model=str(tiny_dir), distill=TeacherDistillation(teacher=str(other)))
    with pytest.raises(InputError, match="vocabulary of 300 tokens, the student 256"):
        module.configure_model()
