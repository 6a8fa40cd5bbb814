"""The training objective against transformers' CsmForConditionalGeneration loss and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from csm_fixtures import TINY_ARGS
from csm_mlx import load_model
from csm_mlx.finetune.batches import amortize, batch_arrays, iterate_batches, sequence_rows
from csm_mlx.finetune.data import Example, TrainingSegment

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4  # relative to the largest gradient entry


def random_segment(rng, n_text, n_frames, train=True):
    return TrainingSegment(rng.integers(0, TINY_ARGS.text_vocab_size, n_text).tolist(),
                           rng.integers(0, 2048, (32, n_frames)).astype(np.int32), train)


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(5)
    conversation = Example([random_segment(rng, 6, 7, train=False), random_segment(rng, 5, 12)], "a:1")
    clip = Example([random_segment(rng, 4, 9)], "a:2")
    return [conversation, clip]


@pytest.fixture(scope="module")
def batch(examples):
    """Our rows and labels for the two sequences, a third of the frames kept for the depth decoder."""
    rng = np.random.default_rng(0)
    rows = []
    for example in examples:
        tokens, mask, labels, frame = sequence_rows(example)
        rows.append((tokens, mask, amortize(labels, frame, 1 / 3, rng)))
    return batch_arrays(rows)


def transformers_inputs(reference, examples, labels):
    """inputs_embeds, attention mask and (B, S, 32) labels as transformers' processor and
    _merge_input_ids_with_input_values build them: audio frames and end-of-audio rows labelled
    with their codes (end of audio: codebook_eos_token_id in every codebook), frames marked -101
    keep codebook 0 only, text -100; the context-only turn is -100 like text."""
    eos_code = reference.config.codebook_eos_token_id
    length = labels.shape[1]
    embeds, attention, expected = [], [], []
    for b, example in enumerate(examples):
        parts, rows = [], []
        for segment in example.segments:
            frames = torch.tensor(segment.audio_codes.T, dtype=torch.long)
            with_eos = torch.cat([frames, torch.full((1, 32), eos_code)])
            parts += [reference.embed_text_tokens(torch.tensor(segment.text_tokens)),
                      reference.backbone_model.embed_tokens(with_eos[None])[0]]
            rows += [torch.full((len(segment.text_tokens), 32), -100), with_eos if segment.train else
                     torch.full(with_eos.shape, -100)]
        x, row_labels = torch.cat(parts), torch.cat(rows)
        n = len(x)
        # frames our batch left out of the depth decoder, in the processor's convention
        left_out = torch.from_numpy(np.array(labels[b, :n, 1] == -100)) & (row_labels[:, 1] != -100)
        row_labels[left_out, 1:] = -100
        embeds.append(torch.cat([x, torch.zeros(length - n, x.shape[1])]))
        attention.append(torch.arange(length) < n)
        expected.append(torch.cat([row_labels, torch.full((length - n, 32), -100)]))
    return torch.stack(embeds), torch.stack(attention).long(), torch.stack(expected)


@pytest.fixture(scope="module")
def torch_result(reference, examples, batch):
    with torch.enable_grad():
        embeds, attention, labels = transformers_inputs(reference, examples, batch[2])
        reference.zero_grad(set_to_none=True)
        out = reference(inputs_embeds=embeds, attention_mask=attention, labels=labels)
        out.loss.backward()
    params = dict(reference.named_parameters())
    grads = {
        "codebook0_head": params["lm_head.weight"].grad.numpy().copy(),
        "audio_head.4": params["depth_decoder.codebooks_head.weight"].grad[4].T.numpy().copy(),
        "backbone.1.q_proj": params["backbone_model.layers.1.self_attn.q_proj.weight"].grad.numpy().copy(),
        "audio_embeddings": params["backbone_model.embed_tokens.embed_audio_tokens.weight"].grad.numpy().copy(),
    }
    reference.zero_grad(set_to_none=True)
    losses = [out.loss.item(), out.backbone_loss.item(), out.depth_decoder_loss.item()]
    return losses, grads, labels


def test_batch_labels_follow_the_processor_convention(examples, batch, torch_result):
    """Same labels as transformers would score, a third of each sequence's frames kept for the
    depth decoder (as many as the processor keeps), end-of-audio always."""
    _, _, expected = torch_result
    np.testing.assert_array_equal(np.array(batch[2]), expected.numpy())
    labels = np.array(batch[2])
    depth_rows = (labels[..., 1:] != -100).any(-1).sum(axis=1)
    assert depth_rows.tolist() == [12 - int(12 * 2 / 3) + 1, 9 - int(9 * 2 / 3) + 1]


@pytest.mark.parametrize("fmt", ["original", "transformers"])
def test_loss_and_gradients_match_transformers(fmt, original_dir, transformers_dir, batch, torch_result):
    model = load_model({"original": original_dir, "transformers": transformers_dir}[fmt])[0]
    tokens, mask, labels = batch
    expected_losses, expected_grads, _ = torch_result

    got = [x.item() for x in model.training_loss(tokens, mask, labels)]
    assert np.abs(np.array(got) - expected_losses).max() <= LOSS_TOLERANCE
    assert min(expected_losses[1:]) > 1.0  # both terms are real, not an empty mean

    grads = nn.value_and_grad(model, lambda m: m.training_loss(tokens, mask, labels)[0])(model)[1]
    ours = {
        "codebook0_head": grads["codebook0_head"]["weight"],
        "audio_head.4": grads["audio_head"][4]["weight"],
        "backbone.1.q_proj": grads["backbone"]["layers"][1]["self_attn"]["q_proj"]["weight"],
        "audio_embeddings": grads["audio_embeddings"]["weight"],
    }
    for name, expected in expected_grads.items():
        scale = np.abs(expected).max()
        assert scale > 0, name
        assert np.abs(np.array(ours[name]) - expected).max() <= GRAD_TOLERANCE * scale, name


def test_depth_decoder_runs_on_trained_frames_only(transformers_dir, examples):
    """Leaving frames out of the depth decoder must not change its loss on the frames kept:
    the loss of a batch equals the loss of the same frames scored one by one."""
    model = load_model(transformers_dir)[0]
    tokens, mask, labels, frame = sequence_rows(examples[1])
    kept = amortize(labels, frame, 1 / 3, np.random.default_rng(1))
    _, _, depth = model.training_loss(*(mx.array(a)[None] for a in (tokens, mask, kept)))
    rows = np.flatnonzero((kept[:, 1:] != -100).any(-1))
    singles = []
    for r in rows:
        only = kept.copy()
        only[np.setdiff1d(np.arange(len(only)), [r]), 1:] = -100
        singles.append(model.training_loss(*(mx.array(a)[None] for a in (tokens, mask, only)))[2].item())
    assert abs(depth.item() - np.mean(singles)) <= 1e-5


def test_batches_cover_the_dataset_in_length_order(examples):
    batches = list(iterate_batches(examples * 2, batch_size=2, seed=0))
    assert len(batches) == 2
    for tokens, mask, labels in batches:
        lengths = np.array(mask).any(-1).sum(1)
        assert lengths[0] == lengths[1]  # sorted by length: equal sequences batched together
