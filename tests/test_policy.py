"""Which directories a transfer needs on the hub collection, and who may have them."""

from __future__ import annotations

import pytest
from traitlets import TraitError

from hub_transfer.model import TransferDocument, TransferItem
from hub_transfer.policy import AccessNeed, AccessPolicy, PolicyError, normalise_path

HUB = "aaaaaaaa-0000-0000-0000-000000000001"
OTHER = "bbbbbbbb-0000-0000-0000-000000000002"


def doc(items, source=OTHER, destination=HUB):
    return TransferDocument(
        source_endpoint=source,
        destination_endpoint=destination,
        items=tuple(TransferItem(*item) for item in items),
    )


def test_destination_file_needs_rw_on_its_parent():
    needs = AccessPolicy().needs(
        doc([("/x/f", "/alice/data/f.txt", False)]), HUB, "alice"
    )
    assert needs == [AccessNeed("/alice/data/", "rw")]


def test_source_recursive_needs_r_on_itself():
    document = doc(
        [("/alice/results", "/tmp/results", True)], source=HUB, destination=OTHER
    )
    assert AccessPolicy().needs(document, HUB, "alice") == [
        AccessNeed("/alice/results/", "r")
    ]


def test_paths_ending_in_slash_are_directories():
    needs = AccessPolicy().needs(doc([("/x/f", "/alice/in/", False)]), HUB, "alice")
    assert needs == [AccessNeed("/alice/in/", "rw")]


def test_several_directories_and_folding():
    document = doc(
        [
            ("/x/1", "/alice/a/1", False),
            ("/x/2", "/alice/b/2", False),
            ("/x/3", "/alice/a/deeper/3", False),  # inside /alice/a/: folded
            ("/x/4", "/alice/a/5", False),
        ]
    )
    assert AccessPolicy().needs(document, HUB, "alice") == [
        AccessNeed("/alice/a/", "rw"),
        AccessNeed("/alice/b/", "rw"),
    ]


def test_within_the_collection_both_sides_count():
    document = doc([("/alice/src/f", "/alice/dst/f", False)], source=HUB)
    assert AccessPolicy().needs(document, HUB, "alice") == [
        AccessNeed("/alice/dst/", "rw"),
        AccessNeed("/alice/src/", "r"),
    ]


def test_not_touching_the_collection_needs_nothing():
    document = doc([("/a", "/b", False)], source=OTHER, destination=OTHER)
    assert AccessPolicy().needs(document, HUB, "alice") == []


@pytest.mark.parametrize(
    "path",
    ["/bob/f", "/f", "/alice", "/alicex/f", "/alice/../bob/f"],
)
def test_outside_the_users_area_is_refused(path):
    with pytest.raises(PolicyError) as caught:
        AccessPolicy().needs(doc([("/x/f", path, False)]), HUB, "alice")
    assert caught.value.status in (400, 403)
    if ".." not in path:
        assert caught.value.error == "path_not_allowed"
        assert caught.value.status == 403


def test_the_root_itself_is_refused_but_inside_is_fine():
    # a file directly in / would need a rule on / : never
    with pytest.raises(PolicyError):
        AccessPolicy().needs(doc([("/x", "/f.txt", False)]), HUB, "alice")
    # a recursive copy into the user's own root is fine
    needs = AccessPolicy().needs(doc([("/x", "/alice/", True)]), HUB, "alice")
    assert needs == [AccessNeed("/alice/", "rw")]


@pytest.mark.parametrize(
    "path",
    [
        "~/f",
        "alice/f",
        "/alice//f",
        "/alice/./f",
        "/alice/../alice/f",
        "/alice/~x",
        "/a\nb",
    ],
)
def test_malformed_paths_are_400(path):
    with pytest.raises(PolicyError) as caught:
        normalise_path(path, "field")
    assert caught.value.status == 400
    assert caught.value.error == "invalid_path"


def test_template_with_prefix():
    policy = AccessPolicy(path_template="/home/{username}/shared/")
    needs = policy.needs(doc([("/x", "/home/alice/shared/f", False)]), HUB, "alice")
    assert needs == [AccessNeed("/home/alice/shared/", "rw")]
    with pytest.raises(PolicyError):
        policy.needs(doc([("/x", "/home/alice/private/f", False)]), HUB, "alice")


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "x\n"])
def test_user_names_that_would_escape_are_refused(name):
    with pytest.raises(PolicyError):
        AccessPolicy().user_root(name)


def test_template_must_contain_username():
    with pytest.raises(TraitError):
        AccessPolicy(path_template="/shared/")


def test_too_many_directories_in_one_transfer():
    policy = AccessPolicy(max_directories=2)
    items = [("/x", f"/alice/d{i}/f", False) for i in range(3)]
    with pytest.raises(PolicyError) as caught:
        policy.needs(doc(items), HUB, "alice")
    assert caught.value.error == "too_many_directories"
    assert caught.value.status == 400
