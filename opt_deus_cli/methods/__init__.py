"""Layer-building methods: one module each, described by methods.base.Method and listed in
methods.registry. Nothing is imported here, so that the registry can load methods lazily."""
