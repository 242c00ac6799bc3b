package cache_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// benchTree is the tree the benchmarks pack: $GRANARY_BENCH_TREE if set
// (docs/cache.md used a copy of GOROOT/src), else a generated one of about
// 32 MiB: source-like text (compressible) and some random binaries.
func benchTree(b *testing.B) (string, int64) {
	b.Helper()
	dir := os.Getenv("GRANARY_BENCH_TREE")
	if dir == "" {
		dir = b.TempDir()
		line := []byte("func example(x int) int { return x*x + 42 } // some source-like text\n")
		text := bytes.Repeat(line, 4096) // ~280 KiB
		rnd := make([]byte, 1<<20)
		for i := range 100 {
			sub := filepath.Join(dir, "pkg", string(rune('a'+i%26)), "src")
			if err := os.MkdirAll(sub, 0o755); err != nil {
				b.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(sub, "file"+string(rune('0'+i/26))+".go"), text, 0o644); err != nil {
				b.Fatal(err)
			}
			if i%20 == 0 {
				rand.Read(rnd)
				if err := os.WriteFile(filepath.Join(sub, "blob"+string(rune('0'+i/26))), rnd, 0o755); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	_, size, err := etcdstore.TreeDigest(dir)
	if err != nil {
		b.Fatal(err)
	}
	return dir, size
}

func BenchmarkPack(b *testing.B) {
	dir, size := benchTree(b)
	b.SetBytes(size)
	var archive int64
	for b.Loop() {
		cw := &countWriter{}
		if _, err := cache.Pack(cw, dir); err != nil {
			b.Fatal(err)
		}
		archive = cw.n
	}
	b.ReportMetric(float64(archive)/float64(size), "ratio")
}

func BenchmarkUnpack(b *testing.B) {
	dir, size := benchTree(b)
	f, err := os.CreateTemp(b.TempDir(), "archive")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := cache.Pack(f, dir); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	for b.Loop() {
		b.StopTimer()
		dst := filepath.Join(b.TempDir(), "out")
		if err := os.Mkdir(dst, 0o755); err != nil {
			b.Fatal(err)
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := cache.Unpack(f, dst, cache.DefaultLimits()); err != nil {
			b.Fatal(err)
		}
	}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }
