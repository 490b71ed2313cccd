"""What several test files share: oracles written from other projects' equations, tiny models and configs, and
the ways the tests run a command. Test files import these as ``helpers.<module>``; no test file imports another."""
