from tests.catalogue.catalogue_fixtures import stubs

__all__ = ["stubs"]
