"""Constrained decoding: the template automaton, and parse rate 1.0 from an untrained tiny model."""

import pytest

import eval_helpers
from productvlm.config import DEFAULT_ANSWER
from productvlm.data.folder import read_split
from productvlm.errors import UserError
from productvlm.inference.predictor import Predictor
from productvlm.prompting.constrained import TemplateAutomaton, compile_template, known_choices
from productvlm.prompting.parse import parse_answer

CATS = {"category3_code": ["TOTE", "TRENCH COATS", "CAPS"]}


@pytest.fixture(scope="session")
def eval_catalog(tmp_path_factory):
    return eval_helpers.catalog(tmp_path_factory.getbasetemp())


@pytest.mark.parametrize(
    "text, ok",
    [
        ("Product: Black Tote, Category: TOTE, Full Price: 1290.0", True),
        (" Product: a, Category: CAPS, Full Price: 7", True),  # the leading space of a ▁-piece
        ("Product: Tote, Small, Category: TRENCH COATS, Full Price: 12.50", True),
        ("Product: , Category: TOTE, Full Price: 10", False),  # empty title
        ("Product: Black Tote, Category: TOT, Full Price: 10", False),  # unknown category
        ("Product: Black Tote, Category: TOTE, Full Price: 1.", False),  # unfinished number
        ("Product: Black Tote, Category: TOTE, Full Price: 1.234", False),  # 2 decimals at most
        ("Product: Price: 5, Category: TOTE, Full Price: 10", False),  # a label inside the title
        ("Product: Black Tote, Category: TOTE, Full Price: 10 USD", False),
    ],
)
def test_automaton_accepts_exactly_the_template(text, ok):
    auto = TemplateAutomaton(compile_template(DEFAULT_ANSWER, CATS))
    assert auto.accepting(auto.feed(auto.start, text)) is ok
    if ok:
        assert parse_answer(text).complete


def test_known_choices_come_from_the_template_fields():
    rows = [{"category3_code": "TOTE", "title": "x"}, {"category3_code": "CAPS", "title": "y"}]
    assert known_choices(DEFAULT_ANSWER, rows) == {"category3_code": ["CAPS", "TOTE"]}
    with pytest.raises(UserError, match="category3_code"):
        compile_template(DEFAULT_ANSWER, {})


def test_untrained_model_writes_only_parseable_answers(tiny_model_dir, eval_catalog):
    train = read_split(eval_catalog, "train")
    rows = read_split(eval_catalog, "validation") + read_split(eval_catalog, "test")
    predictor = Predictor(tiny_model_dir, num_crops=1, device="cpu", dtype="float32", max_new_tokens=24)
    free = predictor.answers(rows[:4], batch_size=4, progress=False)
    assert not any(parse_answer(a).complete for a in free)  # the premise: unconstrained, it is noise
    predictor.constrain(train)
    answers = predictor.answers(rows, batch_size=4, progress=False)
    parsed = [parse_answer(a) for a in answers]
    assert all(p.complete for p in parsed), answers
    assert {p.category for p in parsed} <= {r["category3_code"] for r in train}
    assert all(predictor.constraint.accepts(a) for a in answers)


def test_answers_finish_even_with_few_new_tokens(tiny_model_dir, eval_catalog):
    train = read_split(eval_catalog, "train")
    predictor = Predictor(tiny_model_dir, num_crops=1, device="cpu", dtype="float32", max_new_tokens=200)
    predictor.constrain(train)
    shortest = predictor.constraint.need[predictor.constraint.automaton.start]
    predictor.max_new_tokens = shortest + 2
    predictor.constrain(train)
    answers = predictor.answers(read_split(eval_catalog, "test"), batch_size=8, progress=False)
    assert all(parse_answer(a).complete for a in answers), answers
    predictor.max_new_tokens = shortest - 1
    with pytest.raises(UserError, match="too few"):
        predictor.constrain(train)
