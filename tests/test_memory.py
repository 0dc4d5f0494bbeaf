"""The edit memory: the gate, edits that live in it, generation with a KV cache, padding, dtypes, GPT-2,
persistence and reverting one edit."""
import dataclasses
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import TINY_EDIT
from kdpo.editing import build_editor, make_config, withhold_evaluation_text
from kdpo.editors.base import PRESERVED_TEXTS
from kdpo.evaluation import score_pairs
from kdpo.layers import find_module
from kdpo.memory import EditMemory, holds_pattern, sentence_end_ids, subject_patterns
from kdpo.modeling import load_model, save_edited
from kdpo.text import goes_on_after, sentences, without_sentences


def random_model(tokenizer, shape: str):
    """A small randomly initialised Llama- or GPT-2-shaped model over the world's vocabulary."""
    torch.manual_seed(0)
    if shape == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
        return LlamaForCausalLM(config).eval(), "layers.1.mlp.down_proj"
    # GPT-2 ties its output to its embeddings: at the default init (std 0.02) no logit can lead by a margin
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, pad_token_id=tokenizer.pad_token_id,
                        initializer_range=0.5)
    return GPT2LMHeadModel(config).eval(), "h.1.mlp.c_proj"


def memory_with_one_slot(model, tokenizer, module: str, subject: str) -> EditMemory:
    """A memory holding one slot for ``subject`` with a large random change, so its effect is visible; its gates
    close at the tokenizer's sentence ends."""
    memory = EditMemory.attach(model, (module,), rank=2, sentence_ends=sentence_end_ids(tokenizer))
    slot = memory.add_slot(subject, subject_patterns(tokenizer, subject))
    generator = torch.Generator().manual_seed(1)
    for b in memory.B:
        b[slot] = torch.randn(b.shape[1:], generator=generator) * 20
    for a in memory.A:
        a[slot] = torch.randn(a.shape[1:], generator=generator)
    return memory


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    return ids


def two_facts_of_one_subject(requests):
    """The first two requests of the first subject that has two."""
    by_subject = {}
    for r in requests:
        by_subject.setdefault(r.subject, []).append(r)
    return next(rs for rs in by_subject.values() if len(rs) >= 2)[:2]


def recorded_hold_checks(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every check of the memory stop rule's held predictions from now on, in order: (reference, where)."""
    import kdpo.editors.base as base

    checks, same_argmax = [], base._same_argmax
    monkeypatch.setattr(base, "_same_argmax", lambda logits, reference, where: checks.append((reference, where)) or
                        same_argmax(logits, reference, where))
    return checks


def test_mentions_are_found_exactly_and_vectorised(tiny_world, tiny_requests, tiny_model):
    model, tokenizer = tiny_model
    memory = EditMemory.attach(model, ("layers.1.mlp.down_proj",), rank=2)
    subjects = list(dict.fromkeys(r.subject for r in tiny_requests))[:20]
    for subject in subjects:
        memory.add_slot(subject, subject_patterns(tokenizer, subject))
    texts = [f"Something about {subject} here" for subject in subjects] + ["no subject at all"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    rows, ends, slots = memory.mentions(encoded["input_ids"])
    found = {(int(r), int(s)) for r, s in zip(rows, slots)}
    assert {(i, memory.slot_of(subject)) for i, subject in enumerate(subjects)} <= found
    assert not any(int(r) == len(subjects) for r in rows)  # the last text mentions nobody
    for row, end, slot in zip(rows.tolist(), ends.tolist(), slots.tolist()):
        pattern = next(p for p in memory.slots[slot].patterns
                       if encoded["input_ids"][row, end - len(p) + 1: end + 1].tolist() == p)
        assert pattern  # every reported mention is the subject's tokens, ending where reported


def test_an_edit_is_done_only_when_the_confident_preserved_predictions_hold(tiny_world, tiny_requests, tiny_model,
                                                                          monkeypatch):
    model, tokenizer = tiny_model
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=TINY_EDIT), tiny_world.corpus())
    confidence, checked, checks = editor.config.memory.hold_confidence, 0, recorded_hold_checks(monkeypatch)
    for request in tiny_requests[:6]:
        checks.clear()
        if not editor.edit(request).reached:
            continue
        slot = editor.memory.slot_of(request.subject)
        preserved = editor._preserved_text(editor.memory.slots[slot].facts, slot)
        with torch.no_grad():
            with editor.memory.muted(slot):
                reference = editor.logits(preserved.text)
            edited = editor.logits(preserved.text)
        confident = preserved.kept & (reference.log_softmax(-1).max(-1).values >= math.log(confidence))  # as the editor
        confident &= ~preserved.now[:, None]  # (other slots' facts are all held, to the model before the edit)
        assert torch.equal(checks[-1][1], (preserved.held | confident)[preserved.kept])  # what the stop rule checked ...
        assert torch.equal(edited.argmax(-1)[confident], reference.argmax(-1)[confident])  # ... and holds
        checked += int(confident.sum())
    assert checked > 0


def test_the_kept_text_holds_the_prompt_after_the_subject_and_not_the_answer(tiny_world, tiny_requests, tiny_model):
    """A slot is on from its subject to the sentence end: what the edit prompt says between the two is kept as the
    model without the slot predicts it (else a later mention runs straight into the target), the answer is not."""
    model, tokenizer = tiny_model
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=TINY_EDIT), tiny_world.corpus())
    request = next(r for r in tiny_requests if not r.prompt.rstrip().endswith(r.subject))  # words follow the subject
    slot = editor.memory.add_slot(request.subject, subject_patterns(tokenizer, request.subject))
    editor.memory.slots[slot].facts = [request.fact]
    preserved = editor._preserved_text([request.fact], slot)
    row = len(preserved.text.input_ids) - 1  # the answered fact comes last
    kept = set(preserved.text.columns[row][preserved.kept[row]].tolist())
    prompt = len(tokenizer(request.prompt)["input_ids"])
    answer = len(tokenizer(f"{request.prompt} {request.target_new}")["input_ids"]) - prompt
    opening = int(editor.memory.first_opening(preserved.text.input_ids[row:], slot)[0])
    assert set(range(opening, prompt - 1)) <= kept and opening < prompt - 1  # the words after the subject
    assert not kept & set(range(prompt - 1, prompt - 1 + answer))  # not the answer's own tokens
    assert prompt - 1 + answer in kept  # and the token after the answer


def test_a_subject_named_in_many_lines_keeps_first_the_lines_that_go_on_after_it(tiny_world, tiny_requests,
                                                                                    tiny_model):
    """Of more corpus lines than are kept, those where a sentence goes on after the subject come first: there the
    slot could move the subject's other facts; a line that only ends on the subject's name shows little of that.
    A line holding the subject's text but not its tokens (the gate stays shut there) is not kept."""
    model, tokenizer = tiny_model

    def inside_a_word(subject: str) -> str:  # the subject's text, but not its tokens
        return f"The thing Xy{subject}zq is here."

    request = next(r for r in tiny_requests if not holds_pattern(
        tokenizer(inside_a_word(r.subject), add_special_tokens=False)["input_ids"], subject_patterns(tokenizer, r.subject)))
    subject = request.subject
    named = [f"The word number {i} is {subject}." for i in range(30)]
    going_on = [f"{subject} is the place number {i} here." for i in range(5)]
    corpus = [inside_a_word(subject)] * 20 + named[:15] + going_on + named[15:]
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=TINY_EDIT), corpus)
    slot = editor.memory.add_slot(subject, subject_patterns(tokenizer, subject))
    preserved = editor._preserved_text([request.fact], slot)
    rows = [row.strip() for row in tokenizer.batch_decode(preserved.text.input_ids[:-1], skip_special_tokens=True)]
    assert len(rows) == PRESERVED_TEXTS  # the last row is the fact answered
    assert sum(row in going_on for row in rows) == len(going_on) and set(rows) <= set(named + going_on)
    assert goes_on_after(f"{going_on[0]} {named[0]}", subject) and not goes_on_after(named[0], subject)


def test_a_retrained_slot_keeps_what_other_slots_facts_say_where_it_opens(tiny_world, tiny_requests, tiny_model,
                                                                           monkeypatch):
    """Another subject's fact whose answer opens a slot ("Orlando is a city in France" and the slot of France) is
    kept as the model says it now, the slot's change as it was: retraining the slot on a new fact of its subject
    must not move how that sentence goes on (else "... in France France France")."""
    model, tokenizer = tiny_model
    first, again = two_facts_of_one_subject(tiny_requests)
    other = next(r for r in tiny_requests if r.subject != first.subject and first.subject not in r.prompt)
    crossing = dataclasses.replace(other, target_new=first.subject)  # its answer is the subject
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=TINY_EDIT), tiny_world.corpus())
    assert editor.edit(first).reached and editor.edit(crossing).reached
    text = tokenizer(f"{crossing.prompt} {crossing.target_new}", return_tensors="pt")
    before = model(**text).logits.log_softmax(-1)
    checks = recorded_hold_checks(monkeypatch)
    assert editor.edit(again).reached  # the subject's slot is retrained on both its facts
    slot = editor.memory.slot_of(first.subject)
    preserved = editor._preserved_text(editor.memory.slots[slot].facts, slot)
    now = preserved.now.nonzero().flatten().tolist()
    assert tokenizer.batch_decode(preserved.text.input_ids[now], skip_special_tokens=True) == [
        f"{crossing.prompt} {crossing.target_new}"]
    assert torch.equal(preserved.held[now], preserved.kept[now]) and preserved.kept[now].any()  # all of it held
    kept_rows, at = preserved.kept.nonzero(as_tuple=True)
    mine = kept_rows == now[0]
    columns = preserved.text.columns[now[0], at[mine]]
    expected = before[0, columns]  # the model before the retrain, not muted
    reference = checks[0][0][mine]  # what the stop rule first checked against
    assert torch.allclose(reference, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    with editor.memory.muted(slot):
        assert not torch.allclose(model(**text).logits.log_softmax(-1)[0, columns], expected,
                                  atol=1e-3)  # the slot's change as it was does act there
    assert torch.equal(model(**text).logits.argmax(-1)[0, columns], expected.argmax(-1))  # it goes on as it did


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ft-m", "ft-l"])
def test_memory_edit_changes_the_subject_only(tiny_world, tiny_requests, tiny_model, method):
    model, tokenizer = tiny_model
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    request = next(r for r in tiny_requests
                   if score_pairs(model, tokenizer, [(r.prompt, r.target_new)])[0] == [0.0])
    other = next(r for r in tiny_requests if r.subject != request.subject and request.subject not in r.prompt)
    encoded = tokenizer(other.prompt, return_tensors="pt")
    before = model(**encoded).logits
    editor = build_editor(model, tokenizer, method, make_config(method, overrides=TINY_EDIT), tiny_world.corpus())
    outcome = editor.edit(request)
    assert outcome.reached and score_pairs(model, tokenizer, [(request.prompt, request.target_new)])[0] == [1.0]
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # base weights untouched
    assert torch.equal(model(**encoded).logits, before)  # no mention, no change: exactly the base model


def test_same_case_replaces_and_revert_takes_one_fact_back(tiny_world, tiny_requests, tiny_model):
    model, tokenizer = tiny_model
    first, second = two_facts_of_one_subject(tiny_requests)
    editor = build_editor(model, tokenizer, "ft-m", make_config("ft-m", overrides=TINY_EDIT), tiny_world.corpus())
    editor.edit(first)
    editor.edit(second)
    assert [f.case_id for f in editor.memory.slots[0].facts] == [first.case_id, second.case_id]
    replacement = dataclasses.replace(first, target_new=second.target_new)
    editor.edit(replacement)
    assert [f.target_new for f in editor.memory.slots[0].facts] == [second.target_new, second.target_new]
    assert editor.revert(first.case_id) and len(editor.memory.slots) == 1
    assert score_pairs(model, tokenizer, [(second.prompt, second.target_new)])[0] == [1.0]
    assert editor.revert(second.case_id) and len(editor.memory.slots) == 0
    assert not editor.revert("no-such-case")


def test_editor_reads_no_evaluation_fields(tiny_world, tiny_requests):
    """Blanking rephrases, locality and portability leaves the edited state bit-identical."""
    requests = tiny_requests[:3]
    blank = [dataclasses.replace(r, rephrase_prompts=(), locality=(), portability=()) for r in requests]
    for protection in ("memory", "null-space"):
        states = []
        for batch in (requests, blank):
            model, tokenizer = load_model(tiny_world.path)
            editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides={"protection": protection}),
                                  tiny_world.corpus())
            for request in batch:
                editor.edit(request)
            memory = EditMemory.of(model)
            states.append([*(p.detach() for p in model.parameters()), *(memory.A + memory.B if memory else [])])
        assert all(torch.equal(a, b) for a, b in zip(*states)), protection


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_generate_with_kv_cache_keeps_the_gate_open(tiny_world, shape):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.path)
    model, module = random_model(tokenizer, shape)
    subject = "Lionel Messi"
    memory_with_one_slot(model, tokenizer, module, subject)
    ids = tokenizer(f"Some words and then {subject} plays", return_tensors="pt")["input_ids"]
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(cached, greedy_without_cache(model, ids, 6))
    # a subject whose tokens arrive across decoding steps opens its slot too
    pattern = subject_patterns(tokenizer, subject)[1]
    prefix = tokenizer("The name is", return_tensors="pt")["input_ids"]
    forced = torch.cat([prefix, torch.tensor([pattern])], 1)
    full = model(input_ids=forced, use_cache=False).logits[:, -1]
    out = model(input_ids=forced[:, :-1], use_cache=True)
    stepped = model(input_ids=forced[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)
    EditMemory.of(model).detach()
    assert not torch.allclose(model(input_ids=forced).logits[:, -1], full, atol=1e-3)  # the slot did act


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_gate_is_open_from_each_mention_to_its_sentence_end(tiny_world, shape):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.path)
    model, module = random_model(tokenizer, shape)
    memory = memory_with_one_slot(model, tokenizer, module, "Lionel Messi")
    ids = tokenizer("Some words. Lionel Messi plays for them. After that, Lionel Messi again. More words",
                    return_tensors="pt")["input_ids"]
    outputs = []
    handle = find_module(model, module).register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    model(input_ids=ids)
    memory.detach()
    model(input_ids=ids)
    handle.remove()
    changed = (outputs[0] - outputs[1]).abs().amax(-1) > 0  # the memory module's own inputs are the base model's
    tokens = ids[0].tolist()
    dots = [i for i, t in enumerate(tokens) if t in sentence_end_ids(tokenizer)]
    ends = [int(e) for e in memory.mentions(ids)[1]]
    expected = torch.zeros(len(tokens), dtype=torch.bool)
    for end in ends:
        expected[end: next(d for d in dots if d > end)] = True
    assert len(ends) == 2 and torch.equal(changed, expected)
    # token by token with the KV cache: the same gates, closed by a sentence end that arrives in a later step
    memory.hook()
    full = model(input_ids=ids, use_cache=False).logits[0]
    out, stepped = None, []
    for position in range(ids.shape[1]):
        out = model(input_ids=ids[:, position: position + 1], past_key_values=out and out.past_key_values,
                    use_cache=True)
        stepped.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(stepped), full, rtol=1e-4, atol=1e-4)


def test_evaluation_sentences_are_withheld_from_the_corpus(tiny_requests):
    request = dataclasses.replace(tiny_requests[0], rephrase_prompts=("The rephrased prompt of it is",))
    corpus = ["A kept sentence. The rephrased prompt of it is here. Another kept one!",
              f"{request.locality[0].prompt} {request.locality[0].ground_truth}.", "Prompt of it is not a match."]
    assert withhold_evaluation_text(corpus, [request]) == ["A kept sentence. Another kept one!",
                                                           "Prompt of it is not a match."]


def test_a_question_and_its_answer_are_one_sentence():
    """Text kept unchanged for a subject drops the statement an edit changes whole: were the question kept without
    its answer, its last position would still predict the old answer, and the edit could not be made (zsRE)."""
    lines = ["Who runs Acme? Bo. Acme is big! Where is Acme? Oslo."]
    assert sentences(lines[0]) == ["Who runs Acme? Bo.", "Acme is big!", "Where is Acme? Oslo."]
    assert without_sentences(lines, lambda sentence: "Bo" in sentence) == ["Acme is big! Where is Acme? Oslo."]


@pytest.mark.parametrize("shape", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_single_rows(tiny_world, shape, side):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.path)
    model, module = random_model(tokenizer, shape)
    memory_with_one_slot(model, tokenizer, module, "Lionel Messi")
    texts = ["Lionel Messi plays for", "A much longer sentence where Lionel Messi appears late", "nobody here"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
    positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp_min(0)  # GPT-2's absolute positions skip padding
    batched = model(**encoded, position_ids=positions).logits
    for row, text in enumerate(texts):
        single = model(**tokenizer(text, return_tensors="pt")).logits[0]
        real = encoded["attention_mask"][row].bool()
        torch.testing.assert_close(batched[row][real], single, rtol=1e-4, atol=1e-4)


def test_memory_edits_a_gpt2_shaped_model(tiny_world, tiny_requests):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.path)
    model, module = random_model(tokenizer, "gpt2")
    # the edit itself on a GPT-2-shaped model (Conv1D modules); preservation is measured on the world
    config = make_config("kdpo", overrides={"memory.modules": module, "max_steps": "300", "memory.preserve_weight": "0"})
    editor = build_editor(model, tokenizer, "kdpo", config, tiny_world.corpus())
    request = tiny_requests[0]
    assert editor.edit(request).reached
    assert score_pairs(model, tokenizer, [(request.prompt, request.target_new)])[0] == [1.0]


def test_bfloat16_model_runs_the_memory(tiny_world, tiny_requests):
    model, tokenizer = load_model(tiny_world.path, dtype="bfloat16")
    request = tiny_requests[0]
    editor = build_editor(model, tokenizer, "ft-m", make_config("ft-m", overrides=TINY_EDIT), tiny_world.corpus())
    editor.edit(request)
    logits = model(**tokenizer(request.prompt, return_tensors="pt")).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_memory_is_saved_and_loaded_with_the_model(tiny_world, tiny_requests, tiny_model, tmp_path):
    model, tokenizer = tiny_model
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo"), tiny_world.corpus())
    for request in tiny_requests[:3]:
        editor.edit(request)
    save_edited(model, tokenizer, tmp_path / "edited")
    loaded, _ = load_model(tmp_path / "edited")
    prompts = tokenizer([r.prompt for r in tiny_requests[:3]], return_tensors="pt", padding=True)
    assert torch.equal(loaded(**prompts).logits, model(**prompts).logits)
    memory = EditMemory.of(loaded)
    assert [s.subject for s in memory.slots] == [s.subject for s in editor.memory.slots]
    assert memory.stats()["facts"] == 3 and memory.stats()["bytes_per_edit"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_on_cuda(tiny_world, tiny_requests):
    model, tokenizer = load_model(tiny_world.path, device="cuda")
    editor = build_editor(model, tokenizer, "kdpo", make_config("kdpo", overrides=TINY_EDIT), tiny_world.corpus())
    assert editor.edit(tiny_requests[0]).reached


def test_a_question_mark_does_not_close_the_gate_before_its_answer():
    """zsRE-style prompts ask a question about the subject; the answer after the ``?`` is what an edit changes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "Who", " runs", " Acme", "?", " Bo", ".", "!", "\n", " It"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(r"\s?\w+|[?.!\n]", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    ends = [words[token] for token in sentence_end_ids(tokenizer)]
    assert ends == [".", "!", "\n"]


def test_a_subject_ending_in_punctuation_is_found_where_the_punctuation_merges():
    """zsRE: "Who originally recorded Goin' Ape!?" tokenizes the subject's "!" with the "?" as one token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "Who", " recorded", " Goin", "'", " Ape", "!", "!?"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s?\w+|'|!\?|!"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    prompt = tokenizer("Who recorded Goin' Ape!?")["input_ids"]
    assert [words[t] for t in prompt] == ["Who", " recorded", " Goin", "'", " Ape", "!?"]
    patterns = subject_patterns(tokenizer, "Goin' Ape!")
    assert [3, 4, 5] in patterns and holds_pattern(prompt, [[3, 4, 5]])


def test_a_subject_missing_from_the_prompt_is_refused_before_the_memory_changes(tiny_world, tiny_requests, tiny_model):
    model, tokenizer = tiny_model
    request = dataclasses.replace(tiny_requests[0], subject="Atlantis")
    editor = build_editor(model, tokenizer, "ft-m", make_config("ft-m", overrides=TINY_EDIT), tiny_world.corpus())
    with pytest.raises(ValueError, match=f"case_id {request.case_id}: field 'subject': 'Atlantis' is not among"):
        editor.edit(request)
    assert not editor.memory.slots


def test_first_opening_is_where_the_slot_starts_to_change_the_model(tiny_world, tiny_requests, tiny_model):
    model, tokenizer = tiny_model
    memory = memory_with_one_slot(model, tokenizer, "layers.1.mlp.down_proj", tiny_requests[0].subject)
    texts = [f"Nothing here. Then {tiny_requests[0].subject} and more", "Nobody at all is named"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    first = memory.first_opening(encoded["input_ids"], 0)
    assert int(first[1]) == encoded["input_ids"].shape[1]  # never opens
    with_slot = model(**encoded).logits
    with memory.muted(0):
        without = model(**encoded).logits
    changed = (with_slot - without).abs().amax(-1)[0] > 0
    assert not changed[: int(first[0])].any() and changed[int(first[0])]


@pytest.mark.parametrize("skipped", [False, True], ids=["all-layers", "layers-below-once"])
@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_slot_passes_run_the_prefix_once_and_match_a_whole_forward(tiny_world, shape, skipped):
    from kdpo.editors.base import _SlotPasses
    from kdpo.modeling import LayerSkip, Logits

    _, tokenizer = load_model(tiny_world.path)
    model, module = random_model(tokenizer, shape)
    module = module.replace(".1.", ".0.")  # a layer above the slot's, to run from the cache
    subject = "Gerald Ames"
    memory = memory_with_one_slot(model, tokenizer, module, subject)
    skip = LayerSkip.after_modules(model, memory.layers) if skipped else None
    assert (skip is not None) == skipped
    texts = [f"{subject} works as a", f"Some long text comes first. Then {subject} is asked about. Then more",
             f"A {subject}"]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    logits = Logits(model)
    openings = memory.first_opening(ids, 0)
    weights = torch.randn(len(texts), ids.shape[1], model.config.hidden_size, generator=torch.Generator().manual_seed(2))

    def whole_rows():  # each row's last hidden states from where the slot opens, from one whole forward
        states = logits.states(ids, mask)
        return [states[row, int(openings[row]): int(mask[row].sum())] for row in range(len(texts))]

    def pass_rows(states=None):  # the same, from the passes
        states = passes() if states is None else states
        return [states[row, passes.local(torch.arange(int(openings[row]), int(mask[row].sum())), torch.tensor(row))]
                for row in range(len(texts))]

    def slot_gradients(rows_of):  # of a loss on these states, for the slot's A and B in training
        parameters = memory.trainable(0)
        sum((rows * weights[row, : len(rows)]).sum() for row, rows in enumerate(rows_of())).backward()
        memory.store()
        return [parameter.grad for parameter in parameters]

    with torch.no_grad():
        whole = whole_rows()
        with memory.muted(0):
            without_slot = whole_rows()
        passes = _SlotPasses(logits, memory, 0, ids, mask, openings, tokenizer.pad_token_id, skip)
        for got, expected in zip(pass_rows(passes.without_slot()), without_slot):
            assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        for _ in range(2):  # each pass continues the cached prefix afresh
            for got, expected in zip(pass_rows(), whole):
                # the same float32 sums in another order: a few ulps of the largest state
                assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    for got, expected in zip(slot_gradients(pass_rows), slot_gradients(whole_rows)):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert int(openings.min()) > 0 and passes.start == int(openings.max())


def test_layer_skip_only_past_a_layer_the_slot_adds_to(tiny_world):
    from kdpo.modeling import LayerSkip

    _, tokenizer = load_model(tiny_world.path)
    model, _ = random_model(tokenizer, "llama")

    def modules(*names):
        return [find_module(model, name) for name in names]

    rng = torch.get_rng_state()
    assert LayerSkip.after_modules(model, modules("layers.0.mlp.down_proj")).after == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws from its own generator
    assert LayerSkip.after_modules(model, modules("layers.0.mlp.down_proj", "layers.0.self_attn.o_proj")) is None
    assert LayerSkip.after_modules(model, modules("layers.0.mlp.up_proj")) is None  # not added to the stream
    assert LayerSkip.after_modules(model, modules("layers.0.mlp.down_proj", "layers.1.mlp.down_proj")) is None
    # half precision cannot tell a small response from rounding: no skip
    assert LayerSkip.after_modules(model.to(torch.bfloat16), modules("layers.0.mlp.down_proj")) is None
    gpt2, _ = random_model(tokenizer, "gpt2")
    assert LayerSkip.after_modules(gpt2, [find_module(gpt2, "h.1.mlp.c_proj")]).after == 1
