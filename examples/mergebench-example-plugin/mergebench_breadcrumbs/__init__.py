"""Model Breadcrumbs as a mergebench plugin (importing ``.method`` registers it)."""
