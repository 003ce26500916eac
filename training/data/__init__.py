"""Concept data: settings, image loading, captions, buckets, class images, latent/text caches.

Import from the submodules (`from .settings import ConceptSettings`); this package import stays cheap
(no torch) so node modules can import settings at load time.
"""
from .settings import ConceptSettings, DataSettings, concept_type_defaults

__all__ = ["ConceptSettings", "DataSettings", "concept_type_defaults"]
