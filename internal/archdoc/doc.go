// Package archdoc holds tests over the repository itself, not over a
// package's behaviour: that docs/architecture.md names every non-test Go
// file (and nothing that does not exist), and that no non-test function is
// longer than MaxFuncLines. It has no code of its own; the tests are the
// point, and they name each offender with its file and line.
package archdoc

// MaxFuncLines is the longest a non-test function may be, counted from its
// func line to its closing brace.
const MaxFuncLines = 80
