"""ISFE training application (runs from the checkout: ``python -m training``)."""
