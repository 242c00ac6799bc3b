// Package deploy holds Granary's Kubernetes manifests (kubernetes/) and,
// in its tests, their check: every manifest decodes strictly into the
// Kubernetes API types and their cross-references agree. It is a module
// of its own so that the main module does not depend on k8s.io/api.
package deploy
