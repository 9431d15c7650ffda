"""The VM factory plugin: bases that make VMs (CreateNew now; template and cache next)."""

from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory

__all__ = ["DirectFactory", "FactoryBase"]
