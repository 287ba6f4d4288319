!> Forced, dissipative, doubly periodic 2-D rotating shallow water: the dynamics only.
!>
!> Fortran twin of the numpy reference `coupler/models/shallow_water.py`: every grid-point
!> value is computed with the same IEEE operations in the same order (explicit parentheses
!> below mirror the numpy expressions), so the two agree bit for bit when compiled without
!> `-ffast-math` and without FMA contraction (x86-64 `-O2` does not contract; on other
!> targets add `-ffp-contract=off`). Change one, change the other.
!>
!> Equations (reduced-gravity layer, f-plane, vector-invariant momentum, flux-form mass):
!>
!>     du/dt =  q (h v) - dB/dx - r u - nu4 lap(lap(u)) + F0 sin(2 pi k y/ly)
!>     dv/dt = -q (h u) - dB/dy - r v - nu4 lap(lap(v))
!>     dh/dt = -d(h u)/dx - d(h v)/dy
!>
!> with q = (f0 + zeta)/h (1/(m s)) and B = g h + (u^2 + v^2)/2 (m^2/s^2). Sadourny's (1975)
!> energy-conserving C-grid discretisation, classical RK4 in time; see the numpy module
!> docstring for the discrete formulas, which are reproduced here line by line.
!>
!> Grid: Arakawa C, doubly periodic, `dx = lx/nx`, `dy = ly/ny`. Arrays are `a(i, j)`, `i` = x
!> (fast), `j` = y, both 1-based global indices (Python `a[j-1, i-1]`). `h(i,j)` lives at the
!> cell centre `((i-1/2) dx, (j-1/2) dy)`, `u(i,j)` on its west face `((i-1) dx, (j-1/2) dy)`,
!> `v(i,j)` on its south face `((i-1/2) dx, (j-1) dy)`, vorticity / PV at the south-west
!> corner `((i-1) dx, (j-1) dy)`.
!>
!> Decomposition: slabs in y. With `nranks` ranks of the communicator passed in, rank `r`
!> owns all `nx` columns and the `nyl = ny/nranks` rows `j0+1 .. j0+nyl`, `j0 = r*nyl`.
!> Local arrays carry `sw_nh = 2` halo rows (the biharmonic stencil reaches 2 rows):
!> `u(nx, 1-sw_nh:nyl+sw_nh)`, local row `jl` is global row `j0 + jl`. Each grid point is
!> computed with the same operations whatever the decomposition, so 1, 2, 4, ... ranks give
!> bit-identical results. MPI is used only for the halo exchange (`MPI_Sendrecv` with the
!> periodic neighbours in `comm`; works for one rank too).
module sw_dynamics
   use mpi
   use iso_fortran_env, only: error_unit
   implicit none
   private

   !> Real kind of all state arrays (float64, = numpy float64).
   integer, parameter, public :: sw_dp = kind(1.0d0)
   !> Halo width (rows) of the local slab arrays.
   integer, parameter, public :: sw_nh = 2
   !> pi as the float64 literal shared with the numpy twin (== Python `math.pi`).
   real(sw_dp), parameter, public :: sw_pi = 3.141592653589793_sw_dp

   integer, parameter :: dp = sw_dp
   integer, parameter :: i8 = selected_int_kind(18)
   !> Length of the Taylor series in sw_sin_2pi_frac.
   integer, parameter :: n_taylor = 12

   !> Initial h perturbation: amplitude (m) and the modes (kx, ky, phase in eighths of a
   !> turn, weight), summed in this order. Same values as INITIAL_AMPLITUDE_M / INITIAL_MODES
   !> in shallow_water.py.
   real(dp), parameter :: init_amplitude_m = 5.0_dp
   integer, parameter :: n_modes = 4
   integer, parameter :: mode_kx(n_modes) = [1, 2, 3, 1]
   integer, parameter :: mode_ky(n_modes) = [1, -1, 2, 3]
   integer, parameter :: mode_ph(n_modes) = [1, 3, 5, 7]
   real(dp), parameter :: mode_w(n_modes) = [1.0_dp, 0.7_dp, 0.5_dp, 0.3_dp]

   !> Model parameters (SI units); same fields and defaults as the Python ShallowWaterParams.
   type, public :: sw_params
      integer :: nx = 64                     !< grid points in x
      integer :: ny = 64                     !< grid points in y (divisible by the rank count)
      real(dp) :: lx_m = 3.2e6_dp            !< domain length in x, m
      real(dp) :: ly_m = 3.2e6_dp            !< domain length in y, m
      real(dp) :: dt_s = 900.0_dp            !< RK4 time step, s (gravity-wave Courant 0.54)
      real(dp) :: f0 = 1.0e-4_dp             !< Coriolis parameter, 1/s
      real(dp) :: g = 1.8_dp                 !< reduced gravity, m/s^2 (c = 30 m/s, Ld = 300 km)
      real(dp) :: h0_m = 500.0_dp            !< mean layer thickness, m
      real(dp) :: viscosity = 1.0e12_dp      !< biharmonic viscosity nu4, m^4/s
      real(dp) :: drag = 3.0e-7_dp           !< linear drag, 1/s
      real(dp) :: forcing_amp = 3.0e-6_dp    !< zonal body-force amplitude F0, m/s^2
      integer :: forcing_wavenumber = 8      !< forcing wavelengths across ly
   end type sw_params

   public :: sw_default_initial_state, sw_step, sw_tendency, sw_halo_exchange
   public :: sw_forcing_profile, sw_sin_2pi_frac, sw_decomposition

contains

   !> sin(2 pi m / n) for integers m and n > 0, libm-free and bit-identical to the numpy
   !> `sin_2pi_frac`: exact integer reduction to x in [-pi/2, pi/2], then a 12-term Taylor
   !> series summed term by term (|error| < 3e-16).
   elemental function sw_sin_2pi_frac(m, n) result(s)
      integer(i8), intent(in) :: m   !< numerator
      integer(i8), intent(in) :: n   !< denominator, > 0
      real(dp) :: s
      integer(i8) :: n4, r
      real(dp) :: x, x2, term
      integer :: k

      n4 = 4_i8*n
      r = modulo(4_i8*m, n4)                       ! 0 .. n4-1
      if (2_i8*r >= n4) r = r - n4                 ! [-pi, pi)
      if (4_i8*r > n4) r = n4/2_i8 - r             ! (pi/2, pi)   -> (0, pi/2)
      if (4_i8*r < -n4) r = -(n4/2_i8) - r         ! [-pi, -pi/2) -> (-pi/2, 0]
      x = ((2.0_dp*sw_pi)*real(r, dp))/real(n4, dp)
      x2 = x*x
      term = x
      s = x
      do k = 1, n_taylor
         term = ((-term)*x2)/real((2*k)*(2*k + 1), dp)
         s = s + term
      end do
   end function sw_sin_2pi_frac

   !> Rank, rank count, local row count and row offset of this rank's slab in `comm`.
   !> `stat` = 0 if `ny` is divisible by the rank count and `nyl >= sw_nh`, else 1.
   subroutine sw_decomposition(p, comm, rank, nranks, nyl, j0, stat)
      type(sw_params), intent(in) :: p   !< parameters (uses ny)
      integer, intent(in) :: comm        !< communicator of the model ranks
      integer, intent(out) :: rank       !< this rank in comm
      integer, intent(out) :: nranks     !< size of comm
      integer, intent(out) :: nyl        !< rows owned by this rank, ny/nranks
      integer, intent(out) :: j0         !< global index of the row before the first owned row
      integer, intent(out) :: stat       !< 0 ok, 1 bad decomposition
      integer :: ierr

      call MPI_Comm_rank(comm, rank, ierr)
      call MPI_Comm_size(comm, nranks, ierr)
      nyl = p%ny/nranks
      j0 = rank*nyl
      stat = 0
      if (nyl*nranks /= p%ny .or. nyl < sw_nh) stat = 1
   end subroutine sw_decomposition

   !> Zonal body force on the local u rows, `fu(jl) = F0 sin(2 pi k (j0+jl-1/2)/ny)`, m/s^2,
   !> for local rows `jl = 1 .. nyl` (y of u row j is (j-1/2) dy).
   pure subroutine sw_forcing_profile(p, j0, nyl, fu)
      type(sw_params), intent(in) :: p     !< parameters
      integer, intent(in) :: j0            !< row offset of the slab
      integer, intent(in) :: nyl           !< local rows
      real(dp), intent(out) :: fu(nyl)     !< forcing, m/s^2
      integer :: jl
      integer(i8) :: jg0

      do jl = 1, nyl
         jg0 = int(j0 + jl - 1, i8)        ! 0-based global row
         fu(jl) = p%forcing_amp*sw_sin_2pi_frac(int(p%forcing_wavenumber, i8)*(2_i8*jg0 + 1_i8), &
                                                2_i8*int(p%ny, i8))
      end do
   end subroutine sw_forcing_profile

   !> Deterministic initial state on the local slab, bit-identical to the numpy
   !> `ShallowWater.default_initial_state()`: u = v = 0 and
   !> h = h0 + A sum_m w_m sin(2 pi (kx_m x/lx + ky_m y/ly + p_m/8)) at the h points.
   !>
   !> The arrays may hold either the `nyl` owned rows only (`size(u,2) == nyl`, no halo) or
   !> the owned rows plus the halo (`size(u,2) == nyl + 2*sw_nh`); in the second case the
   !> halo rows are filled with the exact periodic values too. Global rows are
   !> `j0+1 .. j0+nyl`. On a shape mismatch `stat` = 1 (or the run aborts if `stat` is absent).
   subroutine sw_default_initial_state(p, j0, nyl, u, v, h, stat)
      type(sw_params), intent(in) :: p          !< parameters
      integer, intent(in) :: j0                 !< row offset of the slab (rank*nyl)
      integer, intent(in) :: nyl                !< owned rows
      real(dp), intent(out) :: u(:, :)          !< x velocity, m/s, (nx, nyl) or (nx, nyl+2*sw_nh)
      real(dp), intent(out) :: v(:, :)          !< y velocity, m/s, same shape
      real(dp), intent(out) :: h(:, :)          !< layer thickness, m, same shape
      integer, intent(out), optional :: stat    !< 0 ok, 1 shape mismatch
      integer :: i, k, m, off, nrow
      integer(i8) :: nx8, ny8, jg0, mm, den
      real(dp) :: pert

      nrow = size(h, 2)
      if (nrow == nyl) then
         off = 0
      else if (nrow == nyl + 2*sw_nh) then
         off = sw_nh
      else
         off = -1
      end if
      if (off < 0 .or. size(h, 1) /= p%nx .or. any(shape(u) /= shape(h)) .or. &
          any(shape(v) /= shape(h))) then
         call fail('sw_default_initial_state: arrays must be (nx, nyl) or (nx, nyl+2*sw_nh)', stat)
         return
      end if
      if (present(stat)) stat = 0

      nx8 = int(p%nx, i8)
      ny8 = int(p%ny, i8)
      den = 16_i8*nx8*ny8
      u = 0.0_dp
      v = 0.0_dp
      do k = 1, nrow
         jg0 = modulo(int(j0 + k - off - 1, i8), ny8)     ! 0-based global row, periodic
         do i = 1, p%nx
            pert = 0.0_dp
            do m = 1, n_modes
               mm = int(mode_kx(m), i8)*(2_i8*int(i - 1, i8) + 1_i8)*ny8*8_i8 &
                    + int(mode_ky(m), i8)*(2_i8*jg0 + 1_i8)*nx8*8_i8 &
                    + int(mode_ph(m), i8)*2_i8*nx8*ny8
               pert = pert + mode_w(m)*sw_sin_2pi_frac(mm, den)
            end do
            h(i, k) = p%h0_m + init_amplitude_m*pert
         end do
      end do
   end subroutine sw_default_initial_state

   !> Fill the `sw_nh` halo rows on both sides of three slab arrays from the periodic
   !> neighbours in `comm` (north = rank+1, south = rank-1, periodic). Two MPI_Sendrecv calls
   !> carry all three fields. Requires `nyl >= sw_nh`.
   subroutine sw_halo_exchange(comm, nx, nyl, a, b, c)
      integer, intent(in) :: comm                              !< communicator
      integer, intent(in) :: nx                                !< columns
      integer, intent(in) :: nyl                               !< owned rows
      real(dp), intent(inout) :: a(nx, 1 - sw_nh:nyl + sw_nh)  !< first field
      real(dp), intent(inout) :: b(nx, 1 - sw_nh:nyl + sw_nh)  !< second field
      real(dp), intent(inout) :: c(nx, 1 - sw_nh:nyl + sw_nh)  !< third field
      real(dp) :: sbuf(nx, sw_nh, 3), rbuf(nx, sw_nh, 3)
      integer :: rank, nranks, north, south, ierr, cnt
      integer, parameter :: tag_up = 4101, tag_down = 4102

      call MPI_Comm_rank(comm, rank, ierr)
      call MPI_Comm_size(comm, nranks, ierr)
      north = modulo(rank + 1, nranks)
      south = modulo(rank - 1, nranks)
      cnt = nx*sw_nh*3

      ! top owned rows -> north neighbour's bottom halo; receive own bottom halo from south
      sbuf(:, :, 1) = a(:, nyl - sw_nh + 1:nyl)
      sbuf(:, :, 2) = b(:, nyl - sw_nh + 1:nyl)
      sbuf(:, :, 3) = c(:, nyl - sw_nh + 1:nyl)
      call MPI_Sendrecv(sbuf, cnt, MPI_DOUBLE_PRECISION, north, tag_up, &
                        rbuf, cnt, MPI_DOUBLE_PRECISION, south, tag_up, comm, MPI_STATUS_IGNORE, ierr)
      a(:, 1 - sw_nh:0) = rbuf(:, :, 1)
      b(:, 1 - sw_nh:0) = rbuf(:, :, 2)
      c(:, 1 - sw_nh:0) = rbuf(:, :, 3)

      ! bottom owned rows -> south neighbour's top halo; receive own top halo from north
      sbuf(:, :, 1) = a(:, 1:sw_nh)
      sbuf(:, :, 2) = b(:, 1:sw_nh)
      sbuf(:, :, 3) = c(:, 1:sw_nh)
      call MPI_Sendrecv(sbuf, cnt, MPI_DOUBLE_PRECISION, south, tag_down, &
                        rbuf, cnt, MPI_DOUBLE_PRECISION, north, tag_down, comm, MPI_STATUS_IGNORE, ierr)
      a(:, nyl + 1:nyl + sw_nh) = rbuf(:, :, 1)
      b(:, nyl + 1:nyl + sw_nh) = rbuf(:, :, 2)
      c(:, nyl + 1:nyl + sw_nh) = rbuf(:, :, 3)
   end subroutine sw_halo_exchange

   !> Tendencies on the owned rows from a slab whose `sw_nh` halo rows are valid.
   !> Units: du, dv in m/s^2, dh in m/s. Exactly the numpy `ShallowWater.tendency`.
   subroutine sw_tendency(p, nyl, fu, u, v, h, du, dv, dh)
      type(sw_params), intent(in) :: p                            !< parameters
      integer, intent(in) :: nyl                                  !< owned rows
      real(dp), intent(in) :: fu(nyl)                             !< forcing on owned u rows, m/s^2
      real(dp), intent(in) :: u(p%nx, 1 - sw_nh:nyl + sw_nh)      !< x velocity, m/s (halo valid)
      real(dp), intent(in) :: v(p%nx, 1 - sw_nh:nyl + sw_nh)      !< y velocity, m/s (halo valid)
      real(dp), intent(in) :: h(p%nx, 1 - sw_nh:nyl + sw_nh)      !< thickness, m (halo valid)
      real(dp), intent(out) :: du(p%nx, nyl)                      !< du/dt, m/s^2
      real(dp), intent(out) :: dv(p%nx, nyl)                      !< dv/dt, m/s^2
      real(dp), intent(out) :: dh(p%nx, nyl)                      !< dh/dt, m/s
      real(dp), allocatable :: uf(:, :), vf(:, :), q(:, :), bern(:, :), qv(:, :), qu(:, :)
      real(dp), allocatable :: lapu(:, :), lapv(:, :)
      integer, allocatable :: ip(:), im(:)
      real(dp) :: rdx, rdy, rdx2, rdy2, zeta, hq, ke, bihu, bihv
      integer :: nx, i, j, lo, hi

      nx = p%nx
      lo = 1 - sw_nh
      hi = nyl + sw_nh
      rdx = 1.0_dp/(p%lx_m/real(nx, dp))
      rdy = 1.0_dp/(p%ly_m/real(p%ny, dp))
      rdx2 = rdx*rdx
      rdy2 = rdy*rdy
      allocate (ip(nx), im(nx))
      do i = 1, nx
         ip(i) = modulo(i, nx) + 1
         im(i) = modulo(i - 2, nx) + 1
      end do
      allocate (uf(nx, lo:hi), vf(nx, lo:hi), q(nx, lo:hi), bern(nx, lo:hi), qv(nx, lo:hi), &
                qu(nx, lo:hi), lapu(nx, lo:hi), lapv(nx, lo:hi))

      ! mass fluxes U = hu*u at u points (rows lo..hi), V = hv*v at v points (rows lo+1..hi), m^2/s
      do j = lo, hi
         do i = 1, nx
            uf(i, j) = (0.5_dp*(h(im(i), j) + h(i, j)))*u(i, j)
         end do
      end do
      do j = lo + 1, hi
         do i = 1, nx
            vf(i, j) = (0.5_dp*(h(i, j - 1) + h(i, j)))*v(i, j)
         end do
      end do
      ! potential vorticity at corners (rows 0..nyl+1), 1/(m s)
      do j = 0, nyl + 1
         do i = 1, nx
            zeta = (v(i, j) - v(im(i), j))*rdx - (u(i, j) - u(i, j - 1))*rdy
            hq = 0.25_dp*((h(i, j) + h(im(i), j)) + (h(i, j - 1) + h(im(i), j - 1)))
            q(i, j) = (p%f0 + zeta)/hq
         end do
      end do
      ! Bernoulli function at h points (rows 0..nyl), m^2/s^2
      do j = 0, nyl
         do i = 1, nx
            ke = 0.25_dp*((u(i, j)*u(i, j) + u(ip(i), j)*u(ip(i), j)) &
                          + (v(i, j)*v(i, j) + v(i, j + 1)*v(i, j + 1)))
            bern(i, j) = p%g*h(i, j) + ke
         end do
      end do
      ! PV fluxes at corners
      do j = 0, nyl + 1
         do i = 1, nx
            qv(i, j) = q(i, j)*(0.5_dp*(vf(im(i), j) + vf(i, j)))
            qu(i, j) = q(i, j)*(0.5_dp*(uf(i, j - 1) + uf(i, j)))
         end do
      end do
      ! Laplacians (rows lo+1..hi-1), units of u / m^2
      do j = lo + 1, hi - 1
         do i = 1, nx
            lapu(i, j) = ((u(ip(i), j) + u(im(i), j)) - 2.0_dp*u(i, j))*rdx2 &
                         + ((u(i, j + 1) + u(i, j - 1)) - 2.0_dp*u(i, j))*rdy2
            lapv(i, j) = ((v(ip(i), j) + v(im(i), j)) - 2.0_dp*v(i, j))*rdx2 &
                         + ((v(i, j + 1) + v(i, j - 1)) - 2.0_dp*v(i, j))*rdy2
         end do
      end do
      ! tendencies on owned rows
      do j = 1, nyl
         do i = 1, nx
            dh(i, j) = -((uf(ip(i), j) - uf(i, j))*rdx + (vf(i, j + 1) - vf(i, j))*rdy)
            bihu = ((lapu(ip(i), j) + lapu(im(i), j)) - 2.0_dp*lapu(i, j))*rdx2 &
                   + ((lapu(i, j + 1) + lapu(i, j - 1)) - 2.0_dp*lapu(i, j))*rdy2
            bihv = ((lapv(ip(i), j) + lapv(im(i), j)) - 2.0_dp*lapv(i, j))*rdx2 &
                   + ((lapv(i, j + 1) + lapv(i, j - 1)) - 2.0_dp*lapv(i, j))*rdy2
            du(i, j) = (((0.5_dp*(qv(i, j) + qv(i, j + 1)) - (bern(i, j) - bern(im(i), j))*rdx) &
                         - p%drag*u(i, j)) - p%viscosity*bihu) + fu(j)
            dv(i, j) = ((((-0.5_dp)*(qu(i, j) + qu(ip(i), j))) - (bern(i, j) - bern(i, j - 1))*rdy) &
                        - p%drag*v(i, j)) - p%viscosity*bihv
         end do
      end do
   end subroutine sw_tendency

   !> One classical RK4 step of `p%dt_s` on this rank's slab, exchanging halos over `comm`
   !> before each of the four tendency evaluations:
   !> k1 = T(s), k2 = T(s + (dt/2) k1), k3 = T(s + (dt/2) k2), k4 = T(s + dt k3),
   !> s <- s + (dt/6) (((k1 + 2 k2) + 2 k3) + k4).
   !>
   !> Arrays are `(nx, 1-sw_nh:nyl+sw_nh)` with `nyl = ny / size(comm)`; only the owned rows
   !> `1..nyl` are read and updated, the halo rows are workspace (left stale). On a bad
   !> decomposition or shape, `stat` = 1 (or the run aborts if `stat` is absent).
   subroutine sw_step(p, comm, u, v, h, stat)
      type(sw_params), intent(in) :: p               !< parameters
      integer, intent(in) :: comm                    !< communicator of the model ranks
      real(dp), intent(inout) :: u(:, 1 - sw_nh:)    !< x velocity, m/s
      real(dp), intent(inout) :: v(:, 1 - sw_nh:)    !< y velocity, m/s
      real(dp), intent(inout) :: h(:, 1 - sw_nh:)    !< layer thickness, m
      integer, intent(out), optional :: stat         !< 0 ok, 1 bad decomposition/shape
      real(dp), allocatable :: us(:, :), vs(:, :), hs(:, :), fu(:)
      real(dp), allocatable :: ku(:, :), kv(:, :), kh(:, :), au(:, :), av(:, :), ah(:, :)
      integer :: rank, nranks, nyl, j0, st, nx, stage
      real(dp) :: dt, half, dt6, c

      call sw_decomposition(p, comm, rank, nranks, nyl, j0, st)
      nx = p%nx
      if (st /= 0 .or. size(u, 1) /= nx .or. size(u, 2) /= nyl + 2*sw_nh .or. &
          any(shape(v) /= shape(u)) .or. any(shape(h) /= shape(u))) then
         call fail('sw_step: need ny divisible by the rank count, ny/nranks >= sw_nh, '// &
                   'and arrays (nx, 1-sw_nh:ny/nranks+sw_nh)', stat, comm)
         return
      end if
      if (present(stat)) stat = 0

      dt = p%dt_s
      half = 0.5_dp*dt
      dt6 = dt/6.0_dp
      allocate (us(nx, 1 - sw_nh:nyl + sw_nh), vs(nx, 1 - sw_nh:nyl + sw_nh), &
                hs(nx, 1 - sw_nh:nyl + sw_nh), fu(nyl))
      allocate (ku(nx, nyl), kv(nx, nyl), kh(nx, nyl), au(nx, nyl), av(nx, nyl), ah(nx, nyl))
      call sw_forcing_profile(p, j0, nyl, fu)

      us = 0.0_dp
      vs = 0.0_dp
      hs = 0.0_dp
      us(:, 1:nyl) = u(:, 1:nyl)
      vs(:, 1:nyl) = v(:, 1:nyl)
      hs(:, 1:nyl) = h(:, 1:nyl)
      do stage = 1, 4
         call sw_halo_exchange(comm, nx, nyl, us, vs, hs)
         call sw_tendency(p, nyl, fu, us, vs, hs, ku, kv, kh)
         select case (stage)
         case (1)
            au = ku
            av = kv
            ah = kh
         case (2, 3)
            au = au + 2.0_dp*ku
            av = av + 2.0_dp*kv
            ah = ah + 2.0_dp*kh
         case (4)
            au = au + ku
            av = av + kv
            ah = ah + kh
         end select
         if (stage < 4) then
            if (stage < 3) then
               c = half
            else
               c = dt
            end if
            us(:, 1:nyl) = u(:, 1:nyl) + c*ku
            vs(:, 1:nyl) = v(:, 1:nyl) + c*kv
            hs(:, 1:nyl) = h(:, 1:nyl) + c*kh
         end if
      end do
      u(:, 1:nyl) = u(:, 1:nyl) + dt6*au
      v(:, 1:nyl) = v(:, 1:nyl) + dt6*av
      h(:, 1:nyl) = h(:, 1:nyl) + dt6*ah
   end subroutine sw_step

   !> Report an error: set `stat` = 1 if present, else print and abort (MPI_Abort on `comm`
   !> if given, else `error stop`).
   subroutine fail(msg, stat, comm)
      character(*), intent(in) :: msg                !< message
      integer, intent(out), optional :: stat         !< error flag to set
      integer, intent(in), optional :: comm          !< communicator to abort
      integer :: ierr

      if (present(stat)) then
         stat = 1
         return
      end if
      write (error_unit, '(a)') 'sw_dynamics: '//msg
      if (present(comm)) then
         call MPI_Abort(comm, 1, ierr)
      end if
      error stop 1
   end subroutine fail

end module sw_dynamics
