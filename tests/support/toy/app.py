"""The toy app: ``POST /notes`` and ``GET /notes/count``."""

from __future__ import annotations

import os
from typing import ClassVar

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel
from pydantic_settings import SettingsConfigDict
from sqlalchemy import func, insert, select

from keel.core.app import ServiceSpec, create_service_app
from keel.core.platform import PlatformDep, ReadKey, WriteKey
from keel.core.settings import ServiceSettings
from tests.support.toy.registration import MIGRATIONS
from tests.support.toy.tables import notes


class ToySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_TOY_", extra="ignore")

    service_name: ClassVar[str] = "toy"
    # A test that runs `keel run` picks a free port and hands it over here.
    default_port: ClassVar[int] = int(os.environ.get("TOY_TEST_PORT") or 8765)


class Note(BaseModel):
    text: str


router = APIRouter()


@router.post("/notes", status_code=201)
async def add_note(note: Note, _key: WriteKey, plat: PlatformDep) -> dict[str, int]:
    async with plat.database.write() as conn:
        made = await conn.execute(insert(notes).values(text=note.text).returning(notes.c.id))
        return {"id": int(made.scalar_one())}


@router.get("/notes/count")
async def count_notes(_key: ReadKey, plat: PlatformDep) -> dict[str, int]:
    async with plat.database.read() as conn:
        return {
            "count": int((await conn.execute(select(func.count()).select_from(notes))).scalar_one())
        }


SPEC = ServiceSpec(
    name="toy",
    title="toy",
    description="Notes, for the platform's tests.",
    routers=[router],
    migrations=MIGRATIONS,
)


def create_app(settings: ToySettings | None = None) -> FastAPI:
    return create_service_app(SPEC, settings or ToySettings())
