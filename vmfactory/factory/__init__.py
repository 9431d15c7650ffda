"""The VM factory plugins (Kata's VMFactory): bases that make ready VMs.

``base`` is the interface, ``direct`` CreateNew (cold boot), ``template`` +
``template_factory`` CreateFromTemplate (clone a saved template); the daemon's
pools (``vmfactory.daemon.pools``) are CreateFromCache over either.
``sequence`` is the get-VM sequence every base runs, ``spec`` turns a config
into a bootable spec, ``warmup`` the throwaway container a pooled VM runs.
"""

from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory

__all__ = ["DirectFactory", "FactoryBase"]
