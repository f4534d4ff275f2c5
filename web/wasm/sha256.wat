;; SHA-256 compression (FIPS 180-4 §6.2.2) for tern.js's incremental `Sha256`, hand-written.
;; Assembled by web/wasm/build.mjs (wabt's wat2wasm from npm) into the base64 string in
;; web/tern.js; rebuild after any change here.
;;
;; Memory layout (the caller, tern.js, fills it):
;;   0..31       the hash state H0..H7 (i32, little-endian as stored by JS typed arrays)
;;   32..287     the 64 round constants K (FIPS 180-4 §4.2.2), written once by tern.js
;;   288..543    the message schedule W0..W63 (scratch)
;;   65536..     input blocks, 64 bytes each (big-endian words, as the standard reads them)
(module
  (memory (export "memory") 2)

  ;; A big-endian word at `p`.
  (func $load_be (param $p i32) (result i32)
    (local $x i32)
    (local.set $x (i32.load (local.get $p)))
    (i32.or
      (i32.and (i32.rotl (local.get $x) (i32.const 8)) (i32.const 0x00ff00ff))
      (i32.and (i32.rotr (local.get $x) (i32.const 8)) (i32.const 0xff00ff00))))

  ;; Hashes `n` 64-byte blocks starting at `p` into the state at 0.
  (func (export "blocks") (param $p i32) (param $n i32)
    (local $a i32) (local $b i32) (local $c i32) (local $d i32)
    (local $e i32) (local $f i32) (local $g i32) (local $h i32)
    (local $t1 i32) (local $t2 i32) (local $j i32) (local $x i32) (local $y i32)
    (block $end
      (loop $block
        (br_if $end (i32.eqz (local.get $n)))
        ;; W0..W15: the block's words.
        (local.set $j (i32.const 0))
        (loop $load
          (i32.store offset=288 (local.get $j)
            (call $load_be (i32.add (local.get $p) (local.get $j))))
          (local.set $j (i32.add (local.get $j) (i32.const 4)))
          (br_if $load (i32.lt_u (local.get $j) (i32.const 64))))
        ;; W16..W63 (j is a byte offset into W).
        (loop $expand
          (local.set $x (i32.load offset=228 (local.get $j))) ;; W[t-15]
          (local.set $y (i32.load offset=280 (local.get $j))) ;; W[t-2]
          (i32.store offset=288 (local.get $j)
            (i32.add
              (i32.add
                (i32.load offset=224 (local.get $j)) ;; W[t-16]
                (i32.xor
                  (i32.xor (i32.rotr (local.get $x) (i32.const 7)) (i32.rotr (local.get $x) (i32.const 18)))
                  (i32.shr_u (local.get $x) (i32.const 3))))
              (i32.add
                (i32.load offset=260 (local.get $j)) ;; W[t-7]
                (i32.xor
                  (i32.xor (i32.rotr (local.get $y) (i32.const 17)) (i32.rotr (local.get $y) (i32.const 19)))
                  (i32.shr_u (local.get $y) (i32.const 10))))))
          (local.set $j (i32.add (local.get $j) (i32.const 4)))
          (br_if $expand (i32.lt_u (local.get $j) (i32.const 256))))
        (local.set $a (i32.load offset=0 (i32.const 0)))
        (local.set $b (i32.load offset=4 (i32.const 0)))
        (local.set $c (i32.load offset=8 (i32.const 0)))
        (local.set $d (i32.load offset=12 (i32.const 0)))
        (local.set $e (i32.load offset=16 (i32.const 0)))
        (local.set $f (i32.load offset=20 (i32.const 0)))
        (local.set $g (i32.load offset=24 (i32.const 0)))
        (local.set $h (i32.load offset=28 (i32.const 0)))
        ;; 64 rounds.
        (local.set $j (i32.const 0))
        (loop $round
          (local.set $t1
            (i32.add
              (i32.add
                (i32.add (local.get $h)
                  (i32.xor
                    (i32.xor (i32.rotr (local.get $e) (i32.const 6)) (i32.rotr (local.get $e) (i32.const 11)))
                    (i32.rotr (local.get $e) (i32.const 25))))
                ;; Ch(e, f, g) = g ^ (e & (f ^ g))
                (i32.xor (local.get $g)
                  (i32.and (local.get $e) (i32.xor (local.get $f) (local.get $g)))))
              (i32.add
                (i32.load offset=32 (local.get $j))    ;; K[t]
                (i32.load offset=288 (local.get $j))))) ;; W[t]
          (local.set $t2
            (i32.add
              (i32.xor
                (i32.xor (i32.rotr (local.get $a) (i32.const 2)) (i32.rotr (local.get $a) (i32.const 13)))
                (i32.rotr (local.get $a) (i32.const 22)))
              ;; Maj(a, b, c) = (a & b) ^ (c & (a ^ b))
              (i32.xor
                (i32.and (local.get $a) (local.get $b))
                (i32.and (local.get $c) (i32.xor (local.get $a) (local.get $b))))))
          (local.set $h (local.get $g))
          (local.set $g (local.get $f))
          (local.set $f (local.get $e))
          (local.set $e (i32.add (local.get $d) (local.get $t1)))
          (local.set $d (local.get $c))
          (local.set $c (local.get $b))
          (local.set $b (local.get $a))
          (local.set $a (i32.add (local.get $t1) (local.get $t2)))
          (local.set $j (i32.add (local.get $j) (i32.const 4)))
          (br_if $round (i32.lt_u (local.get $j) (i32.const 256))))
        (i32.store offset=0 (i32.const 0) (i32.add (i32.load offset=0 (i32.const 0)) (local.get $a)))
        (i32.store offset=4 (i32.const 0) (i32.add (i32.load offset=4 (i32.const 0)) (local.get $b)))
        (i32.store offset=8 (i32.const 0) (i32.add (i32.load offset=8 (i32.const 0)) (local.get $c)))
        (i32.store offset=12 (i32.const 0) (i32.add (i32.load offset=12 (i32.const 0)) (local.get $d)))
        (i32.store offset=16 (i32.const 0) (i32.add (i32.load offset=16 (i32.const 0)) (local.get $e)))
        (i32.store offset=20 (i32.const 0) (i32.add (i32.load offset=20 (i32.const 0)) (local.get $f)))
        (i32.store offset=24 (i32.const 0) (i32.add (i32.load offset=24 (i32.const 0)) (local.get $g)))
        (i32.store offset=28 (i32.const 0) (i32.add (i32.load offset=28 (i32.const 0)) (local.get $h)))
        (local.set $p (i32.add (local.get $p) (i32.const 64)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $block))))
)
