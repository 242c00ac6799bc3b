package core

import "context"

// MaxNeeds is the most packages one build may declare it needs. A
// package's needs are checked and recorded in the one etcd transaction
// that publishes it, and etcd allows 128 comparisons in a transaction
// (two per need) by default.
const MaxNeeds = 60

// Need is one package a build needs, as its builder finds it.
type Need struct {
	ID  string // the package's ID
	Dir string // its OutputDirectory, a stable path the build may embed
}

// NeedsHandler is implemented by handlers whose packages can be built on
// other packages of the same store.
type NeedsHandler interface {
	ContextHandler

	// BuildNeeds is BuildContext for a package that needs the packages
	// needs (IDs, at most MaxNeeds). If the package is available already
	// it returns at once. Otherwise it first takes a reference on every
	// need, waiting for a need that is being built and failing with an
	// error wrapping ErrPackageNotExist that names a need that is not
	// available; the builder runs while they are held and finds them with
	// NeedsOf; the published package records its needs. From then on a
	// reference on the package protects its needs, and theirs, from
	// removal, and a need cannot be removed while the package exists.
	BuildNeeds(ctx context.Context, needs []string, builder func(ctx context.Context) error) error
}

type needsKey struct{}

// WithNeeds returns ctx carrying needs, for a builder: implementations of
// NeedsHandler call it on the context they give the builder.
func WithNeeds(ctx context.Context, needs []Need) context.Context {
	return context.WithValue(ctx, needsKey{}, needs)
}

// NeedsOf returns the needs a builder's context carries (see
// NeedsHandler.BuildNeeds), in the order they were declared, or nil.
func NeedsOf(ctx context.Context) []Need {
	n, _ := ctx.Value(needsKey{}).([]Need)
	return n
}
