"""Lifecycle states: the guard decorator and the one logged place of change."""

from __future__ import annotations

import enum
import logging

import pytest

from vmfactory.util.states import Lifecycle, require


class Light(enum.Enum):
    OFF = "off"
    ON = "on"


class Lamp(Lifecycle[Light]):
    id = "l1"

    def __init__(self) -> None:
        self._set_state(Light.OFF)

    def _state_error(self, operation: str) -> Exception:
        return ValueError(f"{operation} while {self.state.value}")

    @require(Light.OFF)
    async def switch_on(self) -> str:
        self._set_state(Light.ON)
        return "on"

    @require(Light.ON, operation="dim the lamp")
    def dim(self) -> int:
        return 50


async def test_guarded_methods_run_only_in_their_states(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=__name__)
    lamp = Lamp()
    with pytest.raises(ValueError, match="dim the lamp while off"):
        lamp.dim()
    assert await lamp.switch_on() == "on"
    assert lamp.dim() == 50
    with pytest.raises(ValueError, match="switch-on while on"):
        await lamp.switch_on()
    assert "Lamp l1: off -> on" in caplog.text
    assert Lamp.dim.allowed_states == (Light.ON,)  # type: ignore[attr-defined]
