package cache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/minio/minio-go/v7"

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

// BenchmarkRemote measures Store (pack and upload) and Fetch (download,
// unpack, digest) of the bench tree for each backend that can run here:
// dir always, http with nginx, s3 with SeaweedFS; fetch-signed is a Fetch
// with trusted keys (the archive is spooled to a temporary file and
// hashed before it is unpacked). For S3, raw-put and raw-get move the
// same archive with the S3 client alone, for comparison.
func BenchmarkRemote(b *testing.B) {
	dir, size := benchTree(b)
	_, rec := benchRecord(b, dir)
	key, err := cache.GenerateKey("bench-1", nil)
	if err != nil {
		b.Fatal(err)
	}
	type backend struct {
		name string
		open func(b *testing.B, opts ...cache.Option) *cache.Remote
		sw   *seaweed
	}
	backends := []backend{{name: "dir", open: func(b *testing.B, opts ...cache.Option) *cache.Remote {
		r, err := cache.NewDir(b.TempDir(), opts...)
		if err != nil {
			b.Fatal(err)
		}
		return r
	}}}
	if _, err := exec.LookPath("nginx"); err == nil {
		n := startNginx(b)
		backends = append(backends, backend{name: "http", open: func(b *testing.B, opts ...cache.Option) *cache.Remote {
			return openHTTP(b, n.url+"/cache/bench/", opts...)
		}})
	}
	if weedBinary() != "" {
		sw := startSeaweed(b)
		b.Setenv("AWS_ACCESS_KEY_ID", s3AccessKey)
		b.Setenv("AWS_SECRET_ACCESS_KEY", s3SecretKey)
		backends = append(backends, backend{name: "s3", sw: sw, open: func(b *testing.B, opts ...cache.Option) *cache.Remote {
			return sw.open(b, "granary", "bench", opts...)
		}})
	}
	ctx := context.Background()
	for _, be := range backends {
		// One store location per backend: dir's open makes a new
		// directory, so keep the first Remote for both.
		up := be.open(b, cache.WithSignKey(key))
		down := up
		if be.name != "dir" {
			down = be.open(b, cache.WithTrustedKeys(key.Public()))
		}
		b.Run(be.name+"/store", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				if err := up.Store(ctx, "bench", dir, rec); err != nil {
					b.Fatal(err)
				}
			}
		})
		fetch := func(b *testing.B, r *cache.Remote) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				dst := filepath.Join(b.TempDir(), "out")
				if err := os.Mkdir(dst, 0o755); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if ok, err := r.Fetch(ctx, "bench", dst); !ok || err != nil {
					b.Fatalf("Fetch = %v, %v", ok, err)
				}
				b.StopTimer()
				os.RemoveAll(dst) //nolint:errcheck // the bench's own temp dir
				b.StartTimer()
			}
		}
		if be.name == "dir" {
			dirBase := up.String()
			plain, err := cache.NewDir(dirBase)
			if err != nil {
				b.Fatal(err)
			}
			signed, err := cache.NewDir(dirBase, cache.WithTrustedKeys(key.Public()))
			if err != nil {
				b.Fatal(err)
			}
			b.Run("dir/fetch", func(b *testing.B) { fetch(b, plain) })
			b.Run("dir/fetch-signed", func(b *testing.B) { fetch(b, signed) })
		} else {
			plain := be.open(b)
			b.Run(be.name+"/fetch", func(b *testing.B) { fetch(b, plain) })
			b.Run(be.name+"/fetch-signed", func(b *testing.B) { fetch(b, down) })
		}
		if be.sw != nil {
			archive := filepath.Join(b.TempDir(), "a.tar.zst")
			f, err := os.Create(archive)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := cache.Pack(f, dir); err != nil {
				b.Fatal(err)
			}
			f.Close()
			b.Run("s3/raw-put", func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					if _, err := be.sw.client.FPutObject(ctx, "granary", "raw/a.tar.zst", archive, minio.PutObjectOptions{PartSize: cache.DefaultPartSize}); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("s3/raw-get", func(b *testing.B) {
				b.SetBytes(size)
				for b.Loop() {
					obj, err := be.sw.client.GetObject(ctx, "granary", "raw/a.tar.zst", minio.GetObjectOptions{})
					if err != nil {
						b.Fatal(err)
					}
					if _, err := io.Copy(io.Discard, obj); err != nil {
						b.Fatal(err)
					}
					obj.Close()
				}
			})
		}
	}
}

func benchRecord(b *testing.B, dir string) (string, etcdstore.PackageRecord) {
	d, size, err := etcdstore.TreeDigest(dir)
	if err != nil {
		b.Fatal(err)
	}
	return dir, etcdstore.PackageRecord{Digest: d, Size: size}
}
