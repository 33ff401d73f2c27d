"""The model card's helpers keep a user's text inside its table cell, code span or code block."""

from __future__ import annotations

from markdown_it import MarkdownIt

from moeforge.build.markdown import cell, code, fenced

MD = MarkdownIt("commonmark").enable("table")


def table_cells(markdown: str) -> list[list]:
    """The body rows of the first table, each a list of its cells' inline tokens' rendered text."""
    tokens = MD.parse(markdown)
    rows, row, inside = [], [], False
    for tok in tokens:
        if tok.type == "tbody_open":
            inside = True
        elif inside and tok.type == "tr_open":
            row = []
        elif inside and tok.type == "inline":
            row.append(MD.renderer.renderInline(tok.children, MD.options, {}))
        elif inside and tok.type == "tr_close":
            rows.append(row)
        elif tok.type == "tbody_close":
            break
    return rows


PROMPTS = ["def f(x):\n    return x | 1", "a `tick` and ``two``", "<script>alert(1)</script> & more", "| lead"]


def test_table_cells_keep_multiline_prompts_pipes_and_html_inside():
    lines = ["| # | name | prompt |", "|---|---|---|"]
    lines += [f"| {i} | {code('we`ird|name', in_table=True)} | {cell(p)} |" for i, p in enumerate(PROMPTS)]
    rows = table_cells("\n".join(lines) + "\n")
    assert len(rows) == len(PROMPTS) and all(len(r) == 3 for r in rows)
    assert rows[0][2] == "def f(x):<br>    return x | 1"
    assert rows[1][2] == "a `tick` and ``two``"
    assert rows[2][2] == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"
    assert rows[3][2] == "| lead"
    assert rows[0][1] == "<code>we`ird|name</code>"


def test_code_spans_hold_backticks():
    assert MD.renderInline(code("a ``b`` c")) == "<code>a ``b`` c</code>"
    assert MD.renderInline(code("`x`")) == "<code>`x`</code>"


def test_a_fenced_block_holds_a_fence():
    text = "prompt: |\n  ```python\n  print(1)\n  ```\nnext: 1"
    html = MD.render("\n".join(fenced(text, "yaml")) + "\nafter\n")
    assert "<code class=\"language-yaml\">" in html and "next: 1" in html and html.rstrip().endswith("<p>after</p>")


def test_the_model_card_keeps_hostile_prompts_in_their_cells(tmp_path, base_and_experts):
    """A built model's card: one table row per expert with five cells, and the recipe block reads back whole."""
    import yaml

    from pipeline import build

    models = base_and_experts
    prompts = [["def f(x):\n    return x | 1", "```python\nprint(1)\n```"], ["<b>bold</b> & `tick`", "| lead"]]
    recipe = {"base_model": str(models["base"]), "gate_mode": "cheap_embed",
              "experts": [{"source_model": str(models[f"e{i}"]), "positive_prompts": prompts[i]} for i in range(2)]}
    card = (build(tmp_path, recipe).model_dir / "README.md").read_text()
    rows = table_cells(card)
    assert len(rows) == 2 and all(len(row) == 5 for row in rows)
    assert rows[0][3] == "def f(x):<br>    return x | 1; ```python<br>print(1)<br>```"
    assert rows[1][3] == "&lt;b&gt;bold&lt;/b&gt; &amp; `tick`; | lead"
    block = next(t for t in MD.parse(card) if t.type == "fence" and t.info == "yaml")
    assert [e["positive_prompts"] for e in yaml.safe_load(block.content)["experts"]] == prompts
