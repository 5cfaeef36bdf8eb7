"""The answer parser: the formats models write, and properties over any title/category/price."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from productvlm.config import DEFAULT_ANSWER
from productvlm.prices import find_price
from productvlm.prompting.parse import Answer, parse_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Product: Beige Check Cashmere Scarf, Category: SCARVES, Full Price: 590.0",
            Answer("Beige Check Cashmere Scarf", "SCARVES", 590.0),
        ),
        ("Category: TOTE, Full Price: $1,290, Product: Tote, Small", Answer("Tote, Small", "TOTE", 1290.0)),
        ("Product: Belt, Category: belts, Full Price: 1290 USD", Answer("Belt", "BELTS", 1290.0)),
        ("Title: Cap\nCategory: CAPS\nPrice: USD 1,290.00", Answer("Cap", "CAPS", 1290.0)),
        (
            "Product: Coat, Category: TRENCH COATS, Full Price: 1.290,00 EUR",
            Answer("Coat", "TRENCH COATS", 1290.0),
        ),
        ("Product: Scarf, Category: SCARVES", Answer("Scarf", "SCARVES", None)),
        ("Full Price: 590.0", Answer(None, None, 590.0)),
        ("Product: Wallet, Category: WALLETS, Full Price: unknown", Answer("Wallet", "WALLETS", None)),
        ("I cannot tell.", Answer()),
        ("", Answer()),
        ("Product: , Category: , Full Price: ", Answer()),
        ("Product: A, Category: B, Full Price: 10\nNote: this is a guess", Answer("A", "B", 10.0)),
    ],
)
def test_parses_what_models_write(text, expected):
    assert parse_answer(text) == expected


@pytest.mark.parametrize(
    "text, price",
    [
        ("590.0", 590.0),
        ("$1,290", 1290.0),
        ("1290 USD", 1290.0),
        ("€ 2.390,50", 2390.5),
        ("12,5", 12.5),
        ("-", None),
    ],
)
def test_price_formats(text, price):
    assert find_price(text) == price


def test_complete_needs_all_three_fields():
    assert parse_answer("Product: a, Category: B, Full Price: 1").complete
    assert not parse_answer("Product: a, Category: B").complete


_word = st.text(
    alphabet=st.characters(categories=["Lu", "Ll", "Nd"], max_codepoint=0x24F), min_size=1, max_size=8
)
titles = (
    st.lists(_word, min_size=1, max_size=6)
    .map(" ".join)
    .filter(
        lambda t: parse_answer(f"x {t}") == Answer()  # no label words followed by ':' inside a title
    )
)
categories = st.lists(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ&", min_size=1, max_size=10), min_size=1, max_size=3
).map(" ".join)
prices = st.decimals(min_value=0, max_value=99_999, places=2).map(float)


@given(title=titles, category=categories, price=prices)
def test_template_roundtrip(title, category, price):
    text = DEFAULT_ANSWER.format(title=title, category3_code=category, full_price=price)
    assert parse_answer(text) == Answer(title, category, pytest.approx(price))


@given(title=titles, category=categories, price=prices)
def test_any_field_order_roundtrip(title, category, price):
    text = f"Full Price: ${price:,.2f}, Category: {category}, Product: {title}"
    assert parse_answer(text) == Answer(title, category, pytest.approx(price))


@given(st.text())
def test_random_text_never_raises(text):
    answer = parse_answer(text)
    assert answer.price is None or isinstance(answer.price, float)
