"""Decoding defaults read from transformers' own ``generation_config.json`` (written here by
``GenerationConfig.save_pretrained``), with transformers' meaning: greedy unless
``do_sample``; refusals say what is wrong (beam search, bounds, non-finite numbers)."""
from __future__ import annotations

import pytest
from transformers import GenerationConfig

from promptfleet.adapters.generation_defaults import (GENERATION_CONFIG_NAME, InvalidGenerationDefaults,
                                                      parse_generation_config, validate_defaults)


def _saved(tmp_path, **fields) -> bytes:
    GenerationConfig(**fields).save_pretrained(tmp_path)
    return (tmp_path / GENERATION_CONFIG_NAME).read_bytes()


def test_sampling_config_maps_field_by_field(tmp_path):
    data = _saved(tmp_path, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3,
                  max_new_tokens=12, stop_strings=["\n", "###"])
    assert parse_generation_config(data).as_dict() == {"temperature": 0.7, "top_p": 0.9, "top_k": 20,
                                                       "repetition_penalty": 1.3, "max_tokens": 12,
                                                       "stop": ["\n", "###"]}


def test_without_do_sample_transformers_decodes_greedily(tmp_path):
    data = _saved(tmp_path, max_new_tokens=5, repetition_penalty=1.2)
    assert not GenerationConfig.from_pretrained(tmp_path).do_sample  # unset: generate() decodes greedily
    assert parse_generation_config(data).as_dict() == {"temperature": 0.0, "max_tokens": 5, "repetition_penalty": 1.2}
    # a hand-written file with a temperature but no do_sample: transformers would not sample either
    assert parse_generation_config(b'{"temperature": 0.7}').as_dict() == {"temperature": 0.0}


def test_beam_search_configs_become_beam_defaults(tmp_path):
    """transformers' beam search settings (num_beams > 1 without do_sample) are served as
    beam-search defaults, its scoring with them; sampling fields do not apply to beams."""
    data = _saved(tmp_path, num_beams=4, length_penalty=0.5, early_stopping="never", max_new_tokens=7)
    assert parse_generation_config(data).as_dict() == {"num_beams": 4, "length_penalty": 0.5,
                                                       "early_stopping": "never", "max_tokens": 7}
    assert parse_generation_config(b'{"num_beams": 2, "early_stopping": true}').as_dict() == \
        {"num_beams": 2, "early_stopping": True}


@pytest.mark.parametrize("fields, match", [
    (dict(num_beams=3, do_sample=True), "beam sampling"),
    (dict(num_beams=3, length_penalty=50.0), "length_penalty"),
    (dict(do_sample=True, temperature=5.0), "temperature"),
    (dict(max_new_tokens=5, repetition_penalty=1000.0), "repetition_penalty"),
])
def test_configs_the_server_cannot_honour_are_refused(tmp_path, fields, match):
    with pytest.raises(InvalidGenerationDefaults, match=match):
        parse_generation_config(_saved(tmp_path, **fields))


@pytest.mark.parametrize("data, match", [
    (b'{"do_sample": true, "temperature": NaN}', "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"a": "' + b"x" * (70 << 10) + b'"}', "over the limit"),
])
def test_malformed_files_are_refused(data, match):
    with pytest.raises(InvalidGenerationDefaults, match=match):
        parse_generation_config(data)


def test_patch_bodies_are_strict():
    assert validate_defaults({"temperature": 0, "stop": "\n"}).as_dict() == {"temperature": 0.0, "stop": "\n"}
    for bad, match in (({"temperature": "0.5"}, "temperature"), ({"num_beams": 0}, "num_beams"),
                       ({"num_beams": 17}, "num_beams"), ({"early_stopping": "always"}, "early_stopping"),
                       ({"stop": ["a"] * 5}, "stop"), ({"max_tokens": 0}, "max_tokens")):
        with pytest.raises(InvalidGenerationDefaults, match=match):
            validate_defaults(bad)


def test_defaults_have_the_completions_api_bounds():
    """A default can never be what a request could not ask: each field's bounds are the
    completions request's own (the two models are declared apart; this keeps them equal)."""
    from promptfleet.adapters.generation_defaults import GenerationDefaults
    from promptfleet.api.schemas import CompletionRequest

    for name, field in GenerationDefaults.model_fields.items():
        if name == "num_beams":  # the request's best_of (with use_beam_search): a narrower range
            best_of = {type(m).__name__: m for m in CompletionRequest.model_fields["best_of"].metadata}
            ours = {type(m).__name__: m for m in field.metadata}
            assert ours["Ge"].ge >= best_of["Ge"].ge and ours["Le"].le <= best_of["Le"].le
            continue
        theirs = CompletionRequest.model_fields[name]
        assert field.metadata == theirs.metadata and field.annotation == theirs.annotation, name
