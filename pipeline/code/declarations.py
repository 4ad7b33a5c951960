"""Chunking stage, source code: what a declaration is in each language family (its node kinds, the
names it adds to the heading path, the node holding its members) and what attaches to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

# node kinds (tree-sitter's names), per language family: see ``pipeline.code.grammars.Grammar.family``
PRELUDE = {  # what attaches to the declaration it precedes
    "js": {"comment", "decorator", "hash_bang_line"},
    "go": {"comment"},
    "rust": {"line_comment", "block_comment", "attribute_item"},
    "java": {"line_comment", "block_comment"},
}
COMMENTS = {"comment", "line_comment", "block_comment", "hash_bang_line"}  # need adjacency to attach

LEAVES = {
    "js": {"function_declaration", "generator_function_declaration", "function_signature", "method_definition",
           "method_signature", "abstract_method_signature", "enum_declaration", "type_alias_declaration"},
    "go": {"function_declaration", "method_elem"},
    "rust": {"function_item", "function_signature_item", "struct_item", "enum_item", "union_item", "type_item",
             "const_item", "static_item", "macro_definition"},
    "java": {"method_declaration", "constructor_declaration", "compact_constructor_declaration",
             "annotation_type_element_declaration"},
}
CONTAINERS = {
    "js": {"class_declaration", "abstract_class_declaration", "class", "interface_declaration", "internal_module",
           "module"},
    "go": set(),
    "rust": {"trait_item", "impl_item", "mod_item"},
    "java": {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration",
             "annotation_type_declaration"},
}
FUNCTION_VALUES = {"arrow_function", "function_expression", "function", "generator_function", "class"}
# nodes whose children are read as if they stood in their place: Java puts an enum's methods one level
# down, after its constants; Go wraps a block's statements in a list
TRANSPARENT = {"enum_body_declarations", "statement_list"}


class Decl(NamedTuple):
    """A declaration: what it adds to the heading path and where its members are."""

    names: tuple[str, ...]  # the heading path elements this declaration adds
    body: Any  # the node whose braces hold the members; None for a leaf


def _text(node: Any) -> str:
    return " ".join(node.text.decode("utf-8", "replace").split())


def _name(node: Any, default: str = "(anonymous)") -> str:
    name = node.child_by_field_name("name")
    return _text(name) if name is not None else default


def _type_name(node: Any) -> str:
    """A type's name without its path or type arguments: ``fmt::Debug`` → ``Debug``, ``Parser<'a>`` → ``Parser``."""
    while node is not None:
        if node.type in {"type_identifier", "primitive_type", "identifier", "field_identifier"}:
            return _text(node)
        if node.type == "generic_type":
            node = node.child_by_field_name("type")
        elif node.type == "scoped_type_identifier":
            node = node.child_by_field_name("name")
        elif node.named_child_count and node.type in {"pointer_type", "reference_type", "parameter_declaration",
                                                      "parenthesized_type", "qualified_type"}:
            node = node.child_by_field_name("type") or node.named_children[-1]
        else:
            return _text(node)
    return "(anonymous)"


def declaration(node: Any, family: str) -> Decl | None:
    """The declaration ``node`` is (with the names it adds to the heading path), or None for other code."""
    kind = node.type
    if family == "js":
        if kind == "export_statement":
            inner = node.child_by_field_name("declaration") or node.child_by_field_name("value")
            if inner is None:
                return None
            found = declaration(inner, family)
            if found is None and inner.type in FUNCTION_VALUES:
                return Decl(("default",), inner.child_by_field_name("body") if inner.type == "class" else None)
            if found is not None and found.names == ("(anonymous)",):
                return found._replace(names=("default",))
            return found
        if kind in {"ambient_declaration", "expression_statement"}:
            inner = [c for c in node.named_children if c.type not in COMMENTS]
            if len(inner) == 1 and inner[0].type in LEAVES[family] | CONTAINERS[family] | {"lexical_declaration",
                                                                                        "variable_declaration"}:
                return declaration(inner[0], family)
            if len(inner) == 1 and kind == "expression_statement" and inner[0].type == "assignment_expression":
                right = inner[0].child_by_field_name("right")
                if right is not None and right.type in FUNCTION_VALUES:
                    return Decl((_text(inner[0].child_by_field_name("left")),), None)
            return None
        if kind in {"lexical_declaration", "variable_declaration"}:
            declarators = [c for c in node.named_children if c.type == "variable_declarator"]
            if len(declarators) == 1:
                value = declarators[0].child_by_field_name("value")
                if value is not None and value.type in FUNCTION_VALUES:
                    return Decl((_name(declarators[0]),), None)
            return None
        if kind in {"field_definition", "public_field_definition"}:
            value = node.child_by_field_name("value")
            key = node.child_by_field_name("property") or node.child_by_field_name("name")
            if value is not None and key is not None and value.type in FUNCTION_VALUES:
                return Decl((_text(key),), None)
            return None
    elif family == "go":
        if kind == "method_declaration":
            receiver = node.child_by_field_name("receiver")
            params = [c for c in receiver.named_children if c.type == "parameter_declaration"] if receiver else []
            if params:
                return Decl((_type_name(params[0]), _name(node)), None)
        if kind == "type_declaration":
            specs = [c for c in node.named_children if c.type in {"type_spec", "type_alias"}]
            if len(specs) != 1:
                return None  # a grouped `type ( ... )` stays module-level code
            spec_type = specs[0].child_by_field_name("type")
            body = spec_type if spec_type is not None and spec_type.type == "interface_type" else None
            return Decl((_name(specs[0]),), body)
    elif family == "rust":
        if kind == "impl_item":
            own = _type_name(node.child_by_field_name("type"))
            trait = node.child_by_field_name("trait")
            name = f"{_type_name(trait)} for {own}" if trait is not None else own
            return Decl((name,), node.child_by_field_name("body"))
        if kind == "mod_item" and node.child_by_field_name("body") is None:
            return Decl((_name(node),), None)  # `mod name;` declares a file
    if kind in LEAVES[family]:
        return Decl((_name(node),), None)
    if kind in CONTAINERS[family]:
        return Decl((_name(node),), node.child_by_field_name("body"))
    return None


def flatten(kids: Sequence[Any]) -> list[Any]:
    """The nodes ``kids`` stand for, ``TRANSPARENT`` ones replaced by their children."""
    out: list[Any] = []
    for kid in kids:
        out.extend(flatten(kid.children) if kid.type in TRANSPARENT else [kid])
    return out
