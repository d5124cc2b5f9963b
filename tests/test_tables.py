"""The one text table every command prints."""

from tardis_onnx.tables import text_table


def test_columns_are_as_wide_as_their_widest_cell_numbers_right_aligned():
    lines = text_table(("op", "before", "after"), [("MatMul", 12, 3), ("Add", 4, 10)], right=(1, 2))
    assert lines == ["op      before  after", "MatMul      12      3", "Add          4     10"]


def test_trailing_spaces_are_trimmed_and_empty_tables_have_a_header():
    assert text_table(("a", "b"), [("long cell", "")]) == ["a          b", "long cell"]
    assert text_table(("name",), []) == ["name"]
