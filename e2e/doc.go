// Package e2e holds Granary's end-to-end fault suite and the tooling that
// builds the container image it runs on.
//
// The image (granary-e2e:dev by default) is FROM scratch: the real etcd
// server and granary, both static Go binaries built here, and Debian's
// busybox-static for builder shells. No registry is needed. Build it with
//
//	go run ./e2e/cmd/e2eimage
//
// then `docker compose up -d` (or `docker-compose up -d`) in the repository
// root gives a three-member etcd cluster and three workers sharing one
// volume. The tests, which build the image themselves, run with
//
//	go test -tags e2e -count=1 ./e2e/...
package e2e
