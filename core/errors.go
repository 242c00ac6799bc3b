package core

import "errors"

// The contract's sentinel errors; callers test them with errors.Is.
//
// How Granary's errors read, in every package: a sentinel is a bare
// phrase ("package does not exist"), with no package prefix; the function
// that performs an operation names it and its subject once
// (`incref "py312": package does not exist`); a caller adds only facts the
// callee did not know, never the operation or the ID again; and the
// program that prints an error puts its own name first, once
// ("granary: ", "granary-run: "), the way os.PathError and fs.ErrNotExist
// read ("open /x: file does not exist").

var (
	// ErrPackageNotExist is returned when a package that must be available
	// is not: IncRef, TryRemove and inspection of a missing package.
	ErrPackageNotExist = errors.New("package does not exist")

	// ErrInvalidID is wrapped by every error about a malformed package ID.
	ErrInvalidID = errors.New("invalid package id")

	// ErrBuildFailed is wrapped by the error that callers waiting on a
	// failed build attempt receive, on this host or another.
	ErrBuildFailed = errors.New("build failed")

	// ErrNoRef is wrapped by the error of DecRef when the caller holds no
	// reference to the package: a DecRef without a reference is an error,
	// never a silent no-op.
	ErrNoRef = errors.New("no reference held")

	// ErrInvalidated is wrapped, together with ErrPackageNotExist, by the
	// error a reference on an invalidated package returns: an operator
	// marked it bad, it is removed once its last holder leaves, and its
	// next build starts afresh.
	ErrInvalidated = errors.New("package invalidated")
)
