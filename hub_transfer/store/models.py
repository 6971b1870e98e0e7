"""Tables: submissions, the ACL rules they hold, and kept credentials.

A *submission* is one POST in ACL mode. It is ``pending`` from the moment its
rules are planned until Globus accepts the transfer (then ``active``, with a
``task_id``) or refuses it (then it is deleted); ``ended`` once its task
succeeded, failed or outlived the maximum lifetime. A *rule* is one Globus ACL rule
on the hub collection; ``globus_rule_id`` stays empty while the rule is only an
intent. ``holds`` links submissions to the rules they use; a rule with no
pending or active holder is revoked.
"""

from __future__ import annotations

import datetime

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime.datetime:
    """Timezone-naive UTC now (SQLite keeps no zone); patchable in tests."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


holds = Table(
    "holds",
    Base.metadata,
    Column(
        "submission_id",
        ForeignKey("submissions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("rule_id", ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True),
)


class SchemaVersion(Base):
    """One row: the schema version this database was last migrated to."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class Submission(Base):
    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hub_user: Mapped[str] = mapped_column(String(255), index=True)
    identity_id: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending|active|ended
    task_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(128))
    task_status: Mapped[str | None] = mapped_column(String(32))
    created: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)
    last_checked: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    next_check: Mapped[datetime.datetime | None] = mapped_column(DateTime, index=True)
    ended: Mapped[datetime.datetime | None] = mapped_column(DateTime)

    rules: Mapped[list[Rule]] = relationship(secondary=holds, back_populates="holders")

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id,
            "label": self.label,
            "state": self.state,
            "status": self.task_status,
            "created": _iso(self.created),
            "last_checked": _iso(self.last_checked),
            "ended": _iso(self.ended),
            "rules": [rule.to_json() for rule in self.rules],
        }


class Rule(Base):
    __tablename__ = "rules"
    __table_args__ = (UniqueConstraint("collection_id", "identity_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[str] = mapped_column(String(64))
    identity_id: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(4096))
    permissions: Mapped[str] = mapped_column(String(4))
    globus_rule_id: Mapped[str | None] = mapped_column(String(64))
    # False when Globus already had the rule (an "Exists" answer): we use it but
    # it is not ours to delete
    owned: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)
    expires: Mapped[datetime.datetime | None] = mapped_column(DateTime)

    holders: Mapped[list[Submission]] = relationship(
        secondary=holds, back_populates="rules"
    )

    def to_json(self) -> dict:
        return {
            "collection_id": self.collection_id,
            "identity_id": self.identity_id,
            "path": self.path,
            "permissions": self.permissions,
            "rule_id": self.globus_rule_id,
            "owned": self.owned,
            "created": _iso(self.created),
            "expires": _iso(self.expires),
            "tasks": sorted(s.task_id for s in self.holders if s.task_id),
        }


class Credential(Base):
    """A user's Transfer refresh token, encrypted, for polling their tasks."""

    __tablename__ = "credentials"

    identity_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    refresh_token: Mapped[bytes] = mapped_column(LargeBinary)
    updated: Mapped[datetime.datetime] = mapped_column(DateTime, default=utcnow)


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() + "Z" if value else None
