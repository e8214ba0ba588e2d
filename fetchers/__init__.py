"""Built-in fetcher plugins, registered under the `substituter.fetchers` entry-point group."""
