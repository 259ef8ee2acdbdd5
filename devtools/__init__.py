"""Development tooling: not part of the site or of the reusable `jobs` app."""
